# syntax=docker/dockerfile:1
# GPU image of the training job. The CUDA runtime ships inside the torch (cu130) and DALI
# (cuda130) wheels and the driver comes from the node through the NVIDIA container toolkit,
# so a slim Python base is enough.
#   docker build -t REGISTRY/cifar-transfer:0.1.0 .
#   docker build --build-arg PRETRAINED_MODEL=inception_resnet_v2 -t REGISTRY/cifar-transfer:0.1.0-irv2 .
FROM python:3.11.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/opt/hf-cache \
    MPLCONFIGDIR=/tmp/matplotlib

RUN groupadd --gid 1000 app \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash app \
    && mkdir -p /opt/hf-cache /runs /data \
    && chown app:app /opt/hf-cache /runs /data

WORKDIR /app

# Dependencies in their own layer, pinned exactly: editing the code does not reinstall them.
COPY docker/requirements.lock docker/requirements.lock
RUN pip install --no-cache-dir --requirement docker/requirements.lock

# Optional: bake ImageNet weights into the image for air-gapped clusters (then run with
# HF_HUB_OFFLINE=1). Without it, weights come from the Hub at run time or from model.weights.
ARG PRETRAINED_MODEL=""
USER 1000:1000
RUN if [ -n "${PRETRAINED_MODEL}" ]; then \
      python -c "import sys, timm; timm.create_model(sys.argv[1], pretrained=True)" "${PRETRAINED_MODEL}"; \
    fi

COPY --chown=app:app pyproject.toml README.md ./
COPY --chown=app:app dali_pipelines ./dali_pipelines
COPY --chown=app:app job ./job

ENTRYPOINT ["/app/job/launch.sh"]
CMD ["--config", "job/configs/finetune.yaml"]
