# hotfleet: one image for the coordinator and the workers (example shop).
# Dev mode only (plaintext gRPC, unsigned releases): see docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/hotfleet
COPY pyproject.toml README.md ./
COPY hotfleet ./hotfleet
COPY node_agent ./node_agent
COPY coordinator ./coordinator
COPY examples ./examples
# Editable, so that `coordctl` inside the container finds examples/releases.
RUN pip install -e . \
    && cp -r examples/shop /srv/shop \
    && useradd --create-home --uid 10001 hotfleet \
    && chown -R hotfleet /srv/shop
USER hotfleet

# coordinator API, agent gRPC, the shop's HTTP
EXPOSE 7600 7070 8080
CMD ["coordctl", "--help"]
