"""The one error type of the store: a message a person can act on."""


class StoreError(Exception):
    """Bad input to a build, or a store/version that cannot be read as written."""
