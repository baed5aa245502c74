"""The REST API under ``/api/v1``: models (request/response bodies), auth (login, API keys), gate (what is
refused before a body is read), fetch (image URLs, SSRF-safe), api (the routes)."""
