# wsiflow container image.
#   CPU (default):  docker build -t wsiflow .
#   GPU:            docker build --build-arg VARIANT=gpu -t wsiflow:gpu .
#   Run:            docker run --rm -v "$PWD/data:/data" wsiflow synth /data/cohort
# OpenSlide comes from the openslide-bin wheel, so no system packages are needed.
FROM python:3.11-slim-bookworm

ARG VARIANT=cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=3 \
    WSIFLOW_HOME=/opt/wsiflow

RUN groupadd --system --gid 10001 wsiflow \
    && useradd --system --uid 10001 --gid wsiflow --create-home --home-dir /home/wsiflow wsiflow

WORKDIR /opt/wsiflow
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY flows ./flows
COPY models ./models
COPY configs ./configs
# prefect.yaml's deployments run from WSIFLOW_HOME in Prefect workers started from this image.
COPY prefect.yaml ./

# The s3 extra lets patch stores live on S3 (s3://bucket/x.zarr); credentials and
# endpoint come from the usual AWS_* variables.
# The gpu variant swaps the CPU TensorFlow wheel for tensorflow[and-cuda]; both
# install the same `tensorflow` package, so the CPU one is removed first.
RUN pip install --no-cache-dir "./[s3]" \
    && if [ "$VARIANT" = "gpu" ]; then \
        pip uninstall --yes tensorflow-cpu \
        && pip install --no-cache-dir "tensorflow[and-cuda]>=2.16,<2.22"; \
    fi \
    && wsiflow --version

USER 10001
WORKDIR /home/wsiflow
# The DeepZoom viewer's default port.
EXPOSE 8000
ENTRYPOINT ["wsiflow"]
CMD ["--help"]
