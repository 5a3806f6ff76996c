"""Data acquisition: CIFAR-10 / image-folder / synthetic sources -> a validated, prepared store.

    store.py      the prepared store (what training reads), its fingerprint and reuse rules
    cifar10.py    the official python-batch layout: download, tarball, restricted unpickling
    folder.py     image folders: listing, bounds, image checks
    synthetic.py  seeded CIFAR-shaped data for tests and demos
    __main__.py   ``python -m job.data prepare --source {cifar10,folder,synthetic} --root PATH --out DIR``

What is validated, and why, is in docs/DATA_SAFETY.md.
"""
from job.data.cifar10 import CIFAR10_CLASSES, CIFAR10_DIR, CIFAR10_MD5, CIFAR10_URL, download_cifar10
from job.data.errors import DataError
from job.data.folder import IMAGE_EXTENSIONS, check_image
from job.data.store import SOURCES, SPLITS, Split, Store, load_store, prepare, prepare_from_config
from job.data.synthetic import write_synthetic_cifar

__all__ = ["CIFAR10_CLASSES", "CIFAR10_DIR", "CIFAR10_MD5", "CIFAR10_URL", "DataError", "IMAGE_EXTENSIONS",
           "SOURCES", "SPLITS", "Split", "Store", "check_image", "download_cifar10", "load_store", "prepare",
           "prepare_from_config", "write_synthetic_cifar"]
