# mirror: pull-through registry cache. Build: docker build -t mirror .
# Run:   docker run -p 5000:5000 -v mirror-data:/var/lib/mirror mirror
FROM python:3.11-slim

WORKDIR /src
COPY pyproject.toml README.md ./
COPY mirror ./mirror
RUN pip install --no-cache-dir . && rm -rf /src

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
