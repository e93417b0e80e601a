# dicom-auth-proxy in a container, beside tools that cannot sign in to Entra ID.
#
#   docker build -t dicom-auth-proxy .                               # the proxy alone
#   docker build --build-arg WITH_AZURE_CLI=1 -t dicom-auth-proxy:az .  # plus the Azure CLI, for --credential cli
#
# BASE can be any Debian-like image with python3 (>= 3.11) and its venv module; the tests build from a
# local debootstrap image because no registry is reachable there.
ARG BASE=python:3.12-slim

FROM ${BASE} AS build
WORKDIR /src
COPY pyproject.toml ./
COPY proxy ./proxy
# Every wheel the runtime needs, so the runtime stage installs offline and carries no build tools.
# pyproject names README.md as the long description; a stub stands in, so editing the README does not
# invalidate the build (it is not in the image's context at all, see .dockerignore).
RUN echo "dicom-auth-proxy: see the project's README" > README.md \
    && python3 -m venv /opt/build \
    && /opt/build/bin/pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${BASE}
# First in this stage, so its cache depends only on BASE and the wheels (buildah does not re-mount a
# cached stage for a step whose own cache was invalidated by an earlier ARG or ENV).
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python3 -m venv /opt/dicom-auth-proxy \
    && /opt/dicom-auth-proxy/bin/pip install --no-cache-dir --no-index --find-links /wheels dicom-auth-proxy

# The Azure CLI in a venv of its own, so its many pins never meet the proxy's.
ARG WITH_AZURE_CLI=0
ARG AZURE_CLI_VERSION=2.91.0
RUN if [ "$WITH_AZURE_CLI" = 1 ]; then \
        python3 -m venv /opt/azure-cli \
        && /opt/azure-cli/bin/pip install --no-cache-dir "azure-cli==${AZURE_CLI_VERSION}" \
        && ln -s /opt/azure-cli/bin/az /usr/local/bin/az; \
    fi

ENV PATH=/opt/dicom-auth-proxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DICOM_PROXY_LISTEN=0.0.0.0:8080

# A fixed uid so a mounted ~/.azure or key file can be made readable to it.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/dicomproxy dicomproxy
USER 10001:10001
WORKDIR /home/dicomproxy

EXPOSE 8080
# The DIMSE gateway's port, used only when it is started with --dimse-listen 0.0.0.0:11112 (and --dimse-allow).
EXPOSE 11112
# The image's own Python asks /-/health on the port that DICOM_PROXY_LISTEN names (no key needed there).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; port = os.environ.get('DICOM_PROXY_LISTEN', ':8080').rsplit(':', 1)[1]; urllib.request.urlopen(f'http://127.0.0.1:{port}/-/health', timeout=4)"]

ENTRYPOINT ["dicom-auth-proxy"]
CMD ["serve"]
