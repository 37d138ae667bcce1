#!/bin/sh
# kaleido exports PNG/SVG/PDF figures through a Chrome or Chromium browser. Install Debian's
# Chromium when none is present and this shell may use apt-get; otherwise say how, and go on:
# the toolkit still writes interactive HTML figures without a browser.
for browser in chromium chromium-browser google-chrome; do
    if command -v "$browser" >/dev/null 2>&1; then
        exit 0
    fi
done
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    echo "installing Chromium for static figure export (apt-get)"
    apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null && exit 0
    echo "warning: apt-get could not install chromium; PNG/SVG figures will be skipped" >&2
    exit 0
fi
echo "note: no Chrome/Chromium found; install one (e.g. 'sudo apt-get install chromium') for PNG/SVG figures" >&2
exit 0
