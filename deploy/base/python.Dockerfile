# A local stand-in for python:3.11-slim-bookworm, for machines that reach no container registry but do
# reach Debian's package mirror (deploy/build_image.sh makes it; elsewhere the real image is pulled).
# Debian 12's python3 is 3.11, as pyproject.toml requires; python-is-python3 gives the `python` that the
# official image has, and python3-venv the venv module the Dockerfile uses.
ARG DEBIAN_BASE=localhost/debian:bookworm-minbase
FROM ${DEBIAN_BASE}
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python-is-python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python --version
ENV LANG=C.UTF-8
CMD ["python3"]
