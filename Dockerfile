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
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps recbole==1.2.1
ENV GX_ANALYTICS_ENABLED=false FEAST_USAGE=False BENTOML_DO_NOT_TRACK=true CTRFLOW_PARAMS=/opt/ctrflow/params.yaml
