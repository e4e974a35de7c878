# The flows image: the weekly-recs package, serving its three deployments (`recsys serve`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Installed as a regular package so flow runs import it from site-packages, not a checkout.
WORKDIR /tmp/build
COPY pyproject.toml README.md requirements.lock ./
# The locked versions first (reproducible), then the project itself without resolving again.
RUN pip install -r requirements.lock
COPY recsys/ recsys/
COPY features/ features/
COPY ranking/ ranking/
COPY training/ training/
COPY inference/ inference/
COPY flows/ flows/
COPY deployments/ deployments/
COPY cli/ cli/
RUN pip install --no-deps . && rm -rf /tmp/build

RUN useradd --create-home --uid 10001 --user-group app \
    && mkdir /data \
    && chown app:app /data
USER app
WORKDIR /home/app

ENV RECSYS_DATA_DIR=/data \
    PREFECT_HOME=/data/prefect \
    PREFECT_SERVER_ANALYTICS_ENABLED=false
VOLUME ["/data"]

CMD ["recsys", "serve"]
