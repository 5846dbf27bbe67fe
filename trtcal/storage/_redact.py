"""Credential masking for the store: `trtcal._secrets` is the one place these rules live."""

from trtcal._secrets import MASK, Scrubber, redact_url, refuse_url_credentials, secret_values

__all__ = ["MASK", "redact_url", "Scrubber", "secret_values", "refuse_url_credentials"]
