"""BigQuery catalog source: a Ray Data datasource over the BigQuery Storage Read API.

Why our own and not ``ray.data.read_bigquery``: that one cannot be given credentials or
endpoints, and reads each stream whole into one block. Here:

- the driver resolves what to read once: a table, or a query run once into a table (the
  job's temporary result table, or ``source.query_destination`` replaced by
  ``CREATE OR REPLACE TABLE ... AS``), and checks the mapped columns against its schema;
- one read session is created with ``selected_fields`` and ``row_restriction`` pushed down
  and up to ``source.max_streams`` streams; each stream is one Ray read task;
- a read task yields each Arrow record batch as it arrives (memory stays bounded by
  what the server sends per message), renamed to the catalog's field names;
- every API call has a bounded retry (``source.timeout_s``), and errors become one
  readable ``CatalogError`` naming the config key, before any task starts.
"""
from __future__ import annotations

import datetime
import functools
import logging
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional

import pyarrow as pa
from google.auth.exceptions import GoogleAuthError
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from engine.errors import CatalogError
from engine.config import SourceConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoints:
    """What a client needs to reach BigQuery; plain data, so read tasks can carry it."""

    project: str
    credentials: Optional[str] = None
    api_endpoint: Optional[str] = None
    read_endpoint: Optional[str] = None
    timeout_s: float = 60.0

    @classmethod
    def from_config(cls, cfg: SourceConfig) -> "Endpoints":
        return cls(cfg.project, cfg.credentials, cfg.api_endpoint, cfg.read_endpoint, cfg.timeout_s)

    def google_credentials(self):
        if self.credentials is None:
            return None  # the clients look up Application Default Credentials themselves
        if self.credentials == "anonymous":
            from google.auth.credentials import AnonymousCredentials

            return AnonymousCredentials()
        from google.oauth2 import service_account

        return service_account.Credentials.from_service_account_file(
            self.credentials, scopes=["https://www.googleapis.com/auth/cloud-platform"])

    def retry(self):
        """The clients' own retry policy, cut to ``timeout_s`` (their defaults retry for 10 min to a day)."""
        from google.api_core import retry

        return retry.Retry(initial=0.5, maximum=5.0, multiplier=2.0, timeout=self.timeout_s,
                           predicate=retry.if_transient_error)

    def bq_client(self):
        from google.cloud import bigquery

        opts = {"api_endpoint": self.api_endpoint} if self.api_endpoint else None
        return bigquery.Client(project=self.project, credentials=self.google_credentials(), client_options=opts)

    def read_client(self):
        from google.cloud.bigquery_storage_v1 import BigQueryReadClient

        endpoint = self.read_endpoint
        if endpoint and endpoint.startswith("http://"):
            import grpc
            from google.cloud.bigquery_storage_v1.services.big_query_read.transports import BigQueryReadGrpcTransport

            # The client always speaks TLS; an emulator speaks plain text. Against it, TLS
            # fails as UNAVAILABLE, which the default policy retries for ten minutes.
            channel = grpc.insecure_channel(endpoint[len("http://"):].rstrip("/"),
                                            options=[("grpc.max_receive_message_length", -1)])
            return BigQueryReadClient(transport=BigQueryReadGrpcTransport(channel=channel))
        opts = {"api_endpoint": endpoint.removeprefix("https://").rstrip("/")} if endpoint else None
        return BigQueryReadClient(credentials=self.google_credentials(), client_options=opts)


def table_ref(name: str, project: str, key: str = "source.table") -> tuple[str, str, str]:
    """``[project.]dataset.table`` (backquotes allowed) -> (project, dataset, table)."""
    parts = name.strip().strip("`").split(".")
    if len(parts) == 2:
        parts = [project] + parts
    if len(parts) != 3 or not all(parts):
        raise CatalogError(f"{key} {name!r}: expected [project.]dataset.table")
    return parts[0], parts[1], parts[2]


def describe(exc: Exception) -> str:
    """One line from a Google API error: its status and the server's own message."""
    from google.api_core import exceptions as gexc

    if isinstance(exc, gexc.GoogleAPICallError):
        first = (exc.errors or [None])[0]  # REST errors: the server's reason and its own words
        first = first if isinstance(first, dict) else {}
        status = getattr(exc.code, "name", None) or str(exc.code)
        reason = f" ({first['reason']})" if first.get("reason") else ""
        text = f"{status}{reason}: {first.get('message') or exc.message}"
        if isinstance(exc, gexc.Forbidden):  # also PermissionDenied, its gRPC form
            text += " (check that the credentials have BigQuery Data Viewer, Read Session User and Job User)"
    elif isinstance(exc, gexc.RetryError):
        cause = exc.cause or exc
        text = f"gave up after retrying ({type(cause).__name__}: {cause}); is the endpoint reachable?"
    else:
        text = f"{type(exc).__name__}: {exc}"
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= 600 else text[:597] + "..."


def _query_parameter(name: str, value):
    from google.cloud import bigquery

    if isinstance(value, list):
        kinds = {_scalar_type(v) for v in value} or {"STRING"}
        if len(kinds) != 1:
            raise CatalogError(f"source.query_parameters.{name}: list items must share one type")
        return bigquery.ArrayQueryParameter(name, kinds.pop(), value)
    return bigquery.ScalarQueryParameter(name, _scalar_type(value), value)


def _scalar_type(value) -> str:
    """BigQuery type of a YAML value (YAML reads 2026-11-01 as a date)."""
    if isinstance(value, datetime.datetime):
        return "TIMESTAMP"
    if isinstance(value, datetime.date):
        return "DATE"
    if isinstance(value, bool):
        return "BOOL"
    if isinstance(value, int):
        return "INT64"
    if isinstance(value, float):
        return "FLOAT64"
    return "STRING"


@dataclass
class Plan:
    """What the driver settled before any task runs."""

    table: tuple[str, str, str]
    rename: dict[str, str]  # source column -> catalog field
    selected: list[str] = field(default_factory=list)


def resolve(cfg: SourceConfig, required: list[str], optional: tuple = ()) -> Plan:
    """Run the query (if any) once, then check that every needed column exists; ``optional``
    columns (``serve.display_columns``) are read when the table has them."""
    from google.api_core import exceptions as gexc

    ep = Endpoints.from_config(cfg)
    try:
        client = ep.bq_client()
    except (OSError, ValueError, GoogleAuthError) as exc:
        what = "no Application Default Credentials" if cfg.credentials is None else "cannot use them"
        raise CatalogError(f"source.credentials: {what}: {describe(exc)}") from None
    if cfg.query:
        key = "source.query"
        try:
            table = _run_query(cfg, client, ep)
        except gexc.GoogleAPICallError as exc:
            raise CatalogError(f"{key}: BigQuery rejected the query: {describe(exc)}") from None
        except gexc.RetryError as exc:
            raise CatalogError(f"{key}: {describe(exc)}") from None
    else:
        key = "source.table"
        table = table_ref(cfg.table, cfg.project)
    name = ".".join(table)
    try:
        schema = client.get_table(name, retry=ep.retry(), timeout=ep.timeout_s).schema
    except (gexc.GoogleAPICallError, gexc.RetryError) as exc:
        raise CatalogError(f"{key}: cannot read table {name}: {describe(exc)}") from None
    have = [f.name for f in schema]
    wanted = {cfg.columns.get(f, f): f for f in required}
    for extra in cfg.extra_columns:
        wanted.setdefault(extra, extra)
    for column in optional:
        if cfg.columns.get(column, column) in have:
            wanted.setdefault(cfg.columns.get(column, column), column)
    missing = [f"{fieldname} (column {col!r})" if col != fieldname else repr(col)
               for col, fieldname in wanted.items() if col not in have]
    if missing:
        raise CatalogError(f"{key}: table {name} lacks column(s) {', '.join(missing)}; it has {have}. "
                           f"Map catalog fields to columns with source.columns.")
    return Plan(table, rename={col: f for col, f in wanted.items() if col != f}, selected=list(wanted))


def _run_query(cfg: SourceConfig, client, ep: Endpoints) -> tuple[str, str, str]:
    """Run the query once; return the table that holds its result."""
    from google.cloud import bigquery

    params = [_query_parameter(k, v) for k, v in cfg.query_parameters.items()]
    job_config = bigquery.QueryJobConfig(query_parameters=params)
    sql = cfg.query
    if cfg.query_destination:
        dest = table_ref(cfg.query_destination, cfg.project, "source.query_destination")
        sql = f"CREATE OR REPLACE TABLE `{'.'.join(dest)}` AS\n{cfg.query}"
    job = client.query(sql, job_config=job_config, retry=ep.retry(), job_retry=None)
    job.result(retry=ep.retry())
    if cfg.query_destination:
        return dest
    d = job.destination
    return d.project, d.dataset_id, d.table_id


@dataclass
class Session:
    streams: list[str]
    schema: bytes  # serialized Arrow schema, as the server sent it
    estimated_rows: Optional[int]
    estimated_bytes: Optional[int]


def open_session(cfg: SourceConfig, plan: Plan) -> Session:
    from google.api_core import exceptions as gexc
    from google.cloud.bigquery_storage_v1 import types

    ep = Endpoints.from_config(cfg)
    project, dataset, table = plan.table
    options = types.ReadSession.TableReadOptions(selected_fields=plan.selected,
                                                 row_restriction=cfg.row_restriction or "")
    requested = types.ReadSession(table=f"projects/{project}/datasets/{dataset}/tables/{table}",
                                  data_format=types.DataFormat.ARROW, read_options=options)
    try:
        session = ep.read_client().create_read_session(
            parent=f"projects/{cfg.project}", read_session=requested, max_stream_count=cfg.max_streams,
            retry=ep.retry(), timeout=ep.timeout_s)
    except (gexc.GoogleAPICallError, gexc.RetryError) as exc:
        key = "source.row_restriction" if cfg.row_restriction else "source.table"
        raise CatalogError(f"{key}: cannot open a read session on {'.'.join(plan.table)}: {describe(exc)}") from None
    log.info("BigQuery read session on %s: %d stream(s) (asked for %d)", ".".join(plan.table),
             len(session.streams), cfg.max_streams)
    return Session([s.name for s in session.streams], bytes(session.arrow_schema.serialized_schema),
                   session.estimated_row_count or None, session.estimated_total_bytes_scanned or None)


def read_stream(ep: Endpoints, stream: str, schema_bytes: bytes, rename: dict[str, str]) -> Iterator[pa.Table]:
    """One stream, one Arrow table per server message: nothing waits for the stream's end.

    ``ReadRowsStream`` resumes at the last row offset after a transient break, so no row is
    read twice or lost; our retry policy bounds how long a reconnect may take.
    """
    schema = pa.ipc.read_schema(pa.py_buffer(schema_bytes))
    names = [rename.get(n, n) for n in schema.names]
    client = ep.read_client()
    for message in client.read_rows(stream, retry=ep.retry()):
        if not message.row_count:
            continue
        batch = pa.ipc.read_record_batch(pa.py_buffer(message.arrow_record_batch.serialized_record_batch), schema)
        yield pa.Table.from_batches([batch]).rename_columns(names)


def stream_parts(cfg: SourceConfig, required: list[str], optional: tuple = ()) -> list:
    """One callable per read stream, yielding its tables (engine.catalog.parts): the query (if
    any) runs and the columns are checked here, on the driver."""
    plan = resolve(cfg, required, optional)
    session = open_session(cfg, plan)
    ep = Endpoints.from_config(cfg)
    return [functools.partial(read_stream, ep, stream, session.schema, plan.rename) for stream in session.streams]


def _output_schema(schema_bytes: bytes, rename: dict[str, str]) -> pa.Schema:
    schema = pa.ipc.read_schema(pa.py_buffer(schema_bytes))
    return pa.schema([f.with_name(rename.get(f.name, f.name)).remove_metadata() for f in schema])


class BigQueryStorageDatasource(Datasource):
    """Constructed on the driver: the query (if any) has run and the columns are checked when this returns."""

    def __init__(self, cfg: SourceConfig, required: list[str], optional: tuple = ()):
        super().__init__()
        self.cfg = cfg
        self.plan = resolve(cfg, required, optional)
        self.session: Optional[Session] = None

    def get_name(self) -> str:
        return "BigQuery"

    def _session(self) -> Session:
        # Ray Data asks for read tasks more than once while planning; one session serves them all.
        if self.session is None:
            self.session = open_session(self.cfg, self.plan)
        return self.session

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return self._session().estimated_bytes

    def get_read_tasks(self, parallelism: int, per_task_row_limit: Optional[int] = None,
                       data_context=None) -> list[ReadTask]:
        """One task per stream; ``parallelism`` is ignored: BigQuery decides the streams (<= max_streams)."""
        session = self._session()
        ep = Endpoints.from_config(self.cfg)
        schema = _output_schema(session.schema, self.plan.rename)
        size = session.estimated_bytes // len(session.streams) if session.estimated_bytes and session.streams else None
        return [ReadTask(functools.partial(read_stream, ep, stream, session.schema, self.plan.rename),
                         BlockMetadata(num_rows=None, size_bytes=size, input_files=None, exec_stats=None),
                         schema=schema, per_task_row_limit=per_task_row_limit)
                for stream in session.streams]
