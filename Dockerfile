# mirror: pull-through registry cache. Build: docker build -t mirror .
# Run:   docker run -p 5000:5000 -v mirror-data:/var/lib/mirror mirror
#
# Reproducible: every Python package comes from constraints/lock.txt at an exact version
# (refresh it with constraints/lock.sh, which documents how it is made); mirror itself is
# installed without dependencies, and `pip check` fails the build when pyproject.toml needs
# a package the lock lacks. What still floats is the base image tag: pin it by digest
# (python:3.11-slim@sha256:...) for a byte-identical rebuild.
FROM python:3.11-slim

WORKDIR /src
# The locked dependencies first: this layer is reused until lock.txt changes.
COPY constraints/lock.txt ./constraints/lock.txt
RUN pip install --no-cache-dir --disable-pip-version-check -r constraints/lock.txt
COPY pyproject.toml README.md ./
COPY mirror ./mirror
# --no-build-isolation: build with the locked setuptools, not whatever is newest today.
RUN pip install --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation . \
    && pip check && rm -rf /src

RUN useradd --system --uid 10001 --home-dir /var/lib/mirror --create-home mirror
COPY conf/mirror.toml /etc/mirror/mirror.toml
USER mirror
WORKDIR /var/lib/mirror
VOLUME /var/lib/mirror
ENV MIRROR_CONFIG=/etc/mirror/mirror.toml \
    MIRROR_STORAGE_ROOT=/var/lib/mirror
EXPOSE 5000
ENTRYPOINT ["mirror"]
CMD ["serve"]
