# The base image for the KFP components on a cluster (CTRFLOW_BASE_IMAGE). Not built here: no Docker engine on
# these machines; build it with docker, kaniko or buildah elsewhere:
#   docker build -t ctrflow/python3.11:0.1.0 .
FROM python:3.11-slim
WORKDIR /opt/ctrflow
COPY pyproject.toml README.md params.yaml ./
COPY ctrflow ctrflow
COPY components components
COPY pipelines pipelines
COPY serving serving
COPY monitoring monitoring
COPY benchmarks benchmarks
COPY feature_repo feature_repo
# torch==2.13.0 exactly; point pip at a CPU-only wheel index (ARG TORCH_INDEX) to keep CUDA out of the image
ARG TORCH_INDEX=""
RUN pip install --no-cache-dir ${TORCH_INDEX:+--index-url $TORCH_INDEX} torch==2.13.0 \
 && pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps recbole==1.2.1
ENV GX_ANALYTICS_ENABLED=false FEAST_USAGE=False BENTOML_DO_NOT_TRACK=true CTRFLOW_PARAMS=/opt/ctrflow/params.yaml
