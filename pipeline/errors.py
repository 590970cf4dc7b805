"""Errors a user can fix. The CLI prints their message (no traceback) and exits with code 2."""


class UserError(Exception):
    """Bad input or config: the CLI prints the message and exits with code 2.

    The message names the file or key, says what is wrong and how to fix it.
    """


def storage_error_message(exc: BaseException) -> str | None:
    """A user-facing paragraph for an S3 failure the user can fix (endpoint unreachable, no
    credentials), or None when `exc` is not one. Never includes credential values: botocore's own
    messages name only the endpoint URL or the missing setting."""
    try:
        from botocore import exceptions as bx
    except ImportError:  # pragma: no cover - botocore ships with s3fs
        return None
    seen = set()
    while exc is not None and id(exc) not in seen:  # also when wrapped by s3fs/fsspec
        seen.add(id(exc))
        if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError)):
            return (f"cannot reach the S3 endpoint: {exc}. Check AWS_ENDPOINT_URL (or "
                    "AWS_ENDPOINT_URL_S3, or endpoint_url in ~/.aws/config) and that the server is up "
                    "and reachable from here; unset it to use AWS itself")
        if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            return (f"no usable S3 credentials ({exc}); set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with ~/.aws/credentials, or run where an "
                    "instance role grants access")
        exc = exc.__cause__ or exc.__context__
    return None
