#!/bin/sh
# Create the broker's password files (hashed, PBKDF2-SHA512):
#   passwd       listener 1883: skusync (add backend services the same way)
#   passwd-apps  listener 9001: the example app user `app`
# Passwords come from the environment and reach mosquitto_passwd on its standard input,
# never on a command line (argv is visible to every local user in ps); any characters
# but a newline work.
#   SKUSYNC_MQTT_PASSWORD=... APP_MQTT_PASSWORD=... ./mosquitto/make-passwd.sh
# Uses mosquitto_passwd from PATH, else the one in the eclipse-mosquitto:2 image.
# MQTT_PASSWD_DIR writes the files elsewhere (default: next to this script).
set -eu
dir=${MQTT_PASSWD_DIR:-$(dirname "$0")}
: "${SKUSYNC_MQTT_PASSWORD:?set SKUSYNC_MQTT_PASSWORD (skusync's broker password)}"
: "${APP_MQTT_PASSWORD:?set APP_MQTT_PASSWORD (the example app user's password)}"
cd "$dir"

# add_user FILE USER PASSWORD
add_user() {
    case "$3" in
    *"
"*) echo "make-passwd.sh: a password must not contain a newline" >&2; exit 1 ;;
    esac
    # printf is a shell builtin: the password is in no process's argv
    if command -v mosquitto_passwd >/dev/null 2>&1; then
        printf '%s\n%s\n' "$3" "$3" | mosquitto_passwd "$1" "$2" >/dev/null
    else
        printf '%s\n%s\n' "$3" "$3" |
            docker run --rm -i -v "$PWD:/work" eclipse-mosquitto:2 \
                mosquitto_passwd "/work/$1" "$2" >/dev/null
    fi
}

for f in passwd passwd-apps; do
    : > "$f"
    chmod 0644 "$f"   # read by the broker's uid inside the container; holds hashes only
done
add_user passwd skusync "$SKUSYNC_MQTT_PASSWORD"
add_user passwd-apps app "$APP_MQTT_PASSWORD"
echo "wrote $(pwd)/passwd and $(pwd)/passwd-apps"
