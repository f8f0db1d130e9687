"""S3 credentials and endpoint for the flows: a prefect-aws AwsCredentials block, or the standard AWS chain.

Only the block's name travels as a flow parameter (what the Prefect UI shows); the keys are read from
the block inside the process that needs them and handed to s3fs, never logged, returned or written.
"""

from __future__ import annotations

from typing import Any, cast


def storage_options(aws_credentials_block: str | None, s3_endpoint_url: str | None) -> dict[str, Any]:
    """fsspec storage options for S3; empty means the standard AWS chain and endpoint variables."""
    options = block_options(aws_credentials_block) if aws_credentials_block else {}
    if s3_endpoint_url:
        options["endpoint_url"] = s3_endpoint_url
    return options


def block_options(name: str) -> dict[str, Any]:
    """Credentials, region and endpoint from the AwsCredentials block `name` (assumed roles included)."""
    from prefect_aws import AwsCredentials

    try:
        block = cast(AwsCredentials, AwsCredentials.load(name))  # sync: the flows and tasks are
    except ValueError as exc:
        raise ValueError(
            f"no AwsCredentials block named {name!r} ({exc}); create it in the Prefect UI "
            f"(Blocks → AWS Credentials) or with AwsCredentials(...).save({name!r})"
        ) from exc
    session = block.get_boto3_session()
    options: dict[str, Any] = {}
    if block.profile_name and block.aws_access_key_id is None:
        # A named profile (an assumed role, SSO): s3fs opens the profile itself, so botocore refreshes
        # its temporary credentials during a long run instead of using the first ones until they expire.
        options["profile"] = block.profile_name
    elif (credentials := session.get_credentials()) is not None:
        frozen = credentials.get_frozen_credentials()
        options.update(key=frozen.access_key, secret=frozen.secret_key, token=frozen.token)
    if session.region_name:
        options["client_kwargs"] = {"region_name": session.region_name}
    if block.aws_client_parameters.endpoint_url:
        options["endpoint_url"] = block.aws_client_parameters.endpoint_url
    return options
