"""An encoder that asks an OpenAI-compatible embeddings endpoint (``reward.backend: openai``).

Teams that already serve an embedding model (text-embeddings-inference, vLLM, infinity, ...)
point the reward at it instead of loading the encoder into every rank. ``EndpointEncoder`` has
the ``encode(texts) -> Encoded`` contract of ``SentenceEncoder``, so ``EmbeddingSimilarityReward``
keeps doing everything else (reference cache by content hash, repetition checks, range check).

What the client cannot know, and what it does instead:

* the server's tokenizer: batches are cut by a *character* budget
  (``reward.endpoint_chars_per_batch``: rows x the batch's longest text, longest first, the
  rule of batching.py applied to character counts) and at most ``reward.batch_size`` texts;
* where the server truncates: a long text is embedded as the server cuts it, and
  ``Encoded.cut`` / ``chunked`` are all False (the step metrics ``reward/encoder_truncated`` and
  ``reward/encoder_chunked`` read 0 with this backend).

Failures: a refused connection, a timeout, HTTP 408 / 429 / 5xx are retried
``reward.endpoint_retries`` times, waiting ``reward.endpoint_backoff_s`` x 2^k before retry k;
then, and at once for any other HTTP error or an answer that is not a well-formed embeddings
list, ``EndpointError`` names the URL. A reward call therefore returns every reward or raises:
the trainer never trains on part of a batch.

The API key is read from the environment variable named by ``reward.endpoint_api_key_env`` (never
from the config file) and sent as ``Authorization: Bearer``; it is kept out of every message and
``repr``. Standard library HTTP only (urllib): nothing to install on the trainer's side.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import time
import urllib.error
import urllib.request

import torch
import torch.nn.functional as F

from nemo_rlsr.config import ConfigError, RewardConfig

from .batching import token_budget_batches
from .encoders import Encoded

__all__ = ["EndpointEncoder", "EndpointError"]

log = logging.getLogger(__name__)

_RETRIED_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class EndpointError(RuntimeError):
    """The embeddings endpoint is down, refused the request, or answered something unusable."""


class _Retryable(Exception):
    """A failure worth another attempt (connection, timeout, overload)."""


class EndpointEncoder:
    """Unit-norm float32 embeddings from ``POST {url}/embeddings`` (the OpenAI embeddings API)."""

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout_s: float = 60.0,
                 retries: int = 3, backoff_s: float = 1.0, batch_size: int = 64, chars_per_batch: int = 65536) -> None:
        self.url = url.rstrip("/") + "/embeddings"
        self.model = model
        self._api_key = api_key
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.batch_size, self.chars_per_batch = batch_size, chars_per_batch
        self.requests = 0  # HTTP requests answered with embeddings (tests count them)
        self._dimension: int | None = None

    @classmethod
    def from_config(cls, cfg: RewardConfig) -> "EndpointEncoder":
        api_key = None
        if cfg.endpoint_api_key_env:
            api_key = os.environ.get(cfg.endpoint_api_key_env)
            if not api_key:
                raise ConfigError(f"reward.endpoint_api_key_env: the environment variable "
                                  f"{cfg.endpoint_api_key_env} is not set or empty")
        return cls(cfg.endpoint_url, cfg.endpoint_model, api_key, cfg.endpoint_timeout_s, cfg.endpoint_retries,
                   cfg.endpoint_backoff_s, cfg.batch_size, cfg.endpoint_chars_per_batch)

    def __repr__(self) -> str:
        return f"EndpointEncoder(url={self.url!r}, model={self.model!r}, api_key={'set' if self._api_key else None})"

    # The reward moves a local encoder off the GPU between steps; a remote one holds nothing here.
    def offload(self) -> None:
        pass

    def onload(self) -> None:
        pass

    @property
    def dimension(self) -> int:
        if self._dimension is None:
            self.encode(["dimension probe"])
        return self._dimension

    def encode(self, texts: list[str]) -> Encoded:
        """Unit-norm float32 CPU embeddings of ``texts`` (an empty text is sent too)."""
        texts = list(texts)
        flags = torch.zeros(len(texts), dtype=torch.bool)
        if not texts:
            return Encoded(torch.zeros(0, self._dimension or 0), flags, flags.clone())
        out: torch.Tensor | None = None
        for rows in token_budget_batches([len(t) for t in texts], self.batch_size, self.chars_per_batch):
            vectors = self._embed_batch([texts[r] for r in rows])
            if out is None:
                out = torch.zeros(len(texts), vectors.shape[1])
            out[rows] = vectors
        return Encoded(F.normalize(out, dim=-1), flags, flags.clone())

    # ---- one request ---------------------------------------------------------------------

    def _embed_batch(self, batch: list[str]) -> torch.Tensor:
        body = json.dumps({"model": self.model, "input": batch, "encoding_format": "float"}).encode()
        for attempt in range(self.retries + 1):
            try:
                payload = self._post(body)
                break
            except _Retryable as exc:
                if attempt == self.retries:
                    raise EndpointError(f"embedding endpoint {self.url} failed after {attempt + 1} attempts: "
                                        f"{exc}") from None
                delay = self.backoff_s * 2**attempt
                log.warning("embedding endpoint %s: %s; retry %d of %d in %.1f s",
                            self.url, exc, attempt + 1, self.retries, delay)
                time.sleep(delay)
        vectors = self._parse(payload, len(batch))
        self.requests += 1
        return vectors

    def _post(self, body: bytes) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            detail = self._redact(exc.read()[:300].decode("utf-8", "replace"))
            message = f"HTTP {exc.code} {exc.reason}: {detail}"
            if exc.code in _RETRIED_STATUS:
                raise _Retryable(message) from None
            raise EndpointError(f"embedding endpoint {self.url} refused the request: {message}") from None
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out (URLError is an OSError)
            reason = getattr(exc, "reason", exc)
            raise _Retryable(self._redact(f"{type(exc).__name__}: {reason}")) from None

    def _parse(self, payload: bytes, n: int) -> torch.Tensor:
        """[n, D] float32 from an embeddings answer, in input order; anything else is an EndpointError."""
        def bad(why: str) -> EndpointError:
            excerpt = self._redact(payload[:200].decode("utf-8", "replace"))
            return EndpointError(f"embedding endpoint {self.url} answered malformed data ({why}): {excerpt!r}")

        try:
            data = json.loads(payload)["data"]
            items = sorted(data, key=lambda item: item["index"])
            indices = [item["index"] for item in items]
            rows = [item["embedding"] for item in items]
        except (ValueError, KeyError, TypeError) as exc:
            raise bad(f"not an embeddings list: {type(exc).__name__} {exc}") from None
        if indices != list(range(n)):
            raise bad(f"{len(indices)} embeddings with indices {indices[:8]} for {n} inputs")
        width = self._dimension or len(rows[0])
        if width == 0 or any(not isinstance(r, list) or len(r) != width for r in rows):
            raise bad(f"embeddings are not lists of one length {width}")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for r in rows for v in r):
            raise bad("an embedding value is not a finite number")
        self._dimension = width
        return torch.tensor(rows, dtype=torch.float32)

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text
