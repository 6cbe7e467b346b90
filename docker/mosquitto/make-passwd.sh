#!/bin/sh
# Create docker/mosquitto/passwd with the skusync user and an example app user, using
# the broker image's mosquitto_passwd (passwords are stored hashed, PBKDF2-SHA512).
#   SKUSYNC_MQTT_PASSWORD=... APP_MQTT_PASSWORD=... ./mosquitto/make-passwd.sh
set -eu
cd "$(dirname "$0")"
: > passwd
chmod 0644 passwd   # read by the broker's uid inside the container; holds hashes only
docker run --rm -v "$PWD:/work" eclipse-mosquitto:2 sh -c "
  mosquitto_passwd -b /work/passwd skusync '${SKUSYNC_MQTT_PASSWORD:-skusync}' &&
  mosquitto_passwd -b /work/passwd app '${APP_MQTT_PASSWORD:-app}'"
echo "wrote $(pwd)/passwd"
