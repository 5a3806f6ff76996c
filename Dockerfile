# syntax=docker/dockerfile:1
# GPU image of the training job. The CUDA runtime ships inside the torch (cu130) and DALI
# (cuda130) wheels and the driver comes from the node (R580 or newer for CUDA 13): through the
# NVIDIA container toolkit, or GKE's mount (below). So a slim Python base is enough.
#   docker build -t REGISTRY/cifar-transfer:0.1.0 .
#   docker build --build-arg PRETRAINED_MODEL=inception_resnet_v2 -t REGISTRY/cifar-transfer:0.1.0-irv2 .
#   docker build --build-arg CUDA=12 -t REGISTRY/cifar-transfer:0.1.0-cu12 .   # drivers older than R580
FROM python:3.11.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/opt/hf-cache \
    MPLCONFIGDIR=/tmp/matplotlib

# The driver, wherever the node puts it. With the NVIDIA container toolkit (EKS, AKS, the GPU
# Operator) it is injected into the standard library paths. GKE's device plugin instead mounts it
# at /usr/local/nvidia/{lib64,bin} without the toolkit: nothing would find libcuda.so and the
# pip-installed torch would see no GPU. NVIDIA's CUDA images set these same three variables.
# NVIDIA_VISIBLE_DEVICES is left unset on purpose: "all" in the image would hand every GPU of
# the node to any pod of this image that asks for none (the data Job) on toolkit nodes.
ENV PATH=/usr/local/nvidia/bin:${PATH} \
    LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/local/nvidia/lib \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# A C compiler and the C library headers: Triton (train.compile=true) builds small C helpers
# the first time it runs. Not version-pinned: the base image is pinned, and Debian replaces
# package versions on its mirrors with each security update, so exact pins would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 1000 app \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash app \
    && mkdir -p /opt/hf-cache /runs /data \
    && chown app:app /opt/hf-cache /runs /data

WORKDIR /app

# Dependencies in their own layer, pinned exactly (setuptools too: it builds the project below
# without fetching anything): editing the code does not reinstall them.
# CUDA=12: the same versions of everything, but torch and torchvision from PyTorch's CUDA 12 index
# (TORCH_CUDA12_INDEX; triton and the CUDA 12 libraries come with them) and DALI's CUDA 12 wheel,
# for nodes whose driver predates R580 (the CUDA 13 wheels need it). CUDA 12.8 builds run on R525
# and newer through CUDA's minor-version compatibility (R570 and newer for Blackwell GPUs).
ARG CUDA=13
ARG TORCH_CUDA12_INDEX=https://download.pytorch.org/whl/cu128
COPY docker/requirements.lock docker/requirements.lock
RUN if [ "${CUDA}" = "13" ]; then \
      pip install --no-cache-dir --requirement docker/requirements.lock; \
    elif [ "${CUDA}" = "12" ]; then \
      grep -v -E '^(torch|torchvision|triton|nvidia-[a-z0-9-]+)==' docker/requirements.lock > /tmp/cuda12.lock \
      && torch="$(sed -n 's/^torch==//p' docker/requirements.lock)" \
      && vision="$(sed -n 's/^torchvision==//p' docker/requirements.lock)" \
      && dali="$(sed -n 's/^nvidia-dali-cuda130==//p' docker/requirements.lock)" \
      && pip install --no-cache-dir --requirement /tmp/cuda12.lock \
      && pip install --no-cache-dir --index-url "${TORCH_CUDA12_INDEX}" "torch==${torch}" "torchvision==${vision}" \
      && pip install --no-cache-dir "nvidia-dali-cuda120==${dali}" \
      && rm /tmp/cuda12.lock; \
    else \
      echo "--build-arg CUDA takes 13 (the default) or 12, got '${CUDA}'" >&2; exit 2; \
    fi

# Optional: bake ImageNet weights into HF_HOME for air-gapped clusters; pods then run with
# HF_HUB_OFFLINE=1 (k8s/submit.sh --offline) and never touch the Hub. Without them, weights come
# from the Hub at run time or from model.weights. Before the code, so code edits keep this layer.
ARG PRETRAINED_MODEL=""
USER 1000:1000
RUN if [ -n "${PRETRAINED_MODEL}" ]; then \
      python -c "import sys, timm; timm.create_model(sys.argv[1], pretrained=True)" "${PRETRAINED_MODEL}"; \
    fi

# The code, owned by root (the job cannot change it), installed as a package so that
# `python -m job...` works from anywhere; /app/job/train.py stays the documented entry point.
USER 0:0
COPY pyproject.toml README.md ./
COPY dali_pipelines ./dali_pipelines
COPY job ./job
COPY --chmod=755 docker/launch.sh docker/launch.sh
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && rm -rf build ./*.egg-info

USER 1000:1000
ENTRYPOINT ["/app/docker/launch.sh"]
CMD ["--config", "job/configs/finetune.yaml"]
