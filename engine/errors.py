"""Errors shared by the catalog sources (files, BigQuery) and the stages that report them."""


class CatalogError(RuntimeError):
    """The catalog cannot be read as a whole (missing file or table, bad query, missing column)."""
