"""The browser UI: static pages and scripts under `static/`, served by the API itself at `/` (no CDN, no build step)."""
