"""`trtcal cache ls|show|get|put|verify|gc|export STORE …`: work with a calibration cache store.

STORE is a local path, `s3://bucket/prefix` (endpoint from AWS_ENDPOINT_URL or
`--storage-option endpoint_url=…`) or any fsspec URL (read-only). Human-readable tables by
default, `--json` for scripts. Credentials never appear in the output or the logs.

`ls`, `verify` and `gc` on a path that holds no store (missing, a file, a folder of other things,
an empty bucket prefix) fail with exit 2; an existing empty local folder is an empty store.

Exit status: 0 done; 1 `verify` found a corrupt entry, or `put` found the key already taken
(nothing was stored; the message says whether the stored artifacts equal yours); 2 an error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from trtcal._io import write_atomic
from trtcal.cli._options import add_storage_option, parse_storage_options
from trtcal.errors import ConfigError, CorruptEntryError, StorageError

log = logging.getLogger(__name__)

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_NOISY_LOGGERS = ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3", "aiohttp", "asyncio")


# argument parsing


def parse_duration(text: str) -> timedelta:
    """`90s`, `30m`, `12h`, `7d`, `2w` (also `1.5h`)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ConfigError(f"duration {text!r} must look like 90s, 30m, 12h, 7d or 2w")
    return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def parse_moment(text: str, now: datetime | None = None) -> datetime:
    """A point in time: an age before now (`7d`) or an ISO date/time (`2026-01-31`, `2026-01-31T12:00Z`; UTC if no zone)."""
    now = now or datetime.now(timezone.utc)
    if _DURATION.fullmatch(text.strip()):
        return now - parse_duration(text)
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{text!r} is neither an age (7d, 12h) nor an ISO date (2026-01-31)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _add_store_arguments(parser: argparse.ArgumentParser, *, read_from: bool) -> None:
    parser.add_argument("store", metavar="STORE", help="store root: local path, s3://bucket/prefix, memory://name")
    parser.add_argument("--namespace", default=None, help="namespace (e.g. a team); ls/verify/gc: filter (all when omitted)")
    add_storage_option(parser, dest="storage_options")
    parser.add_argument("--json", action="store_true", default=None, help="machine-readable output")
    if read_from:
        parser.add_argument(
            "--read-from", action="append", default=None, metavar="URL[#NAMESPACE]", help="also look in this store (repeatable)"
        )
        parser.add_argument("--on-corrupt", choices=["fail", "recompute"], default=None, help="what a corrupt entry does")


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key", dest="key_prefix", default=None, metavar="PREFIX", help="key (prefix)")
    parser.add_argument("--model", dest="model_sha256", default=None, metavar="SHA256", help="model sha256 (prefix)")
    parser.add_argument("--algorithm", default=None, help="calibration method (entropy2, minmax, ...)")
    parser.add_argument("--older-than", default=None, metavar="AGE|DATE", help="created before: 7d, 12h, 2026-01-31")
    parser.add_argument("--newer-than", default=None, metavar="AGE|DATE", help="created after: 7d, 12h, 2026-01-31")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "cache",
        help="list, inspect, fetch, publish, verify, clean and export cached calibrations",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="cache_action", metavar="ACTION")
    actions.required = True

    p = actions.add_parser("ls", help="list entries (all namespaces unless --namespace)")
    _add_store_arguments(p, read_from=False)
    _add_filters(p)
    p.set_defaults(func=cmd_ls)

    p = actions.add_parser("show", help="show an entry's manifest and verify it")
    _add_store_arguments(p, read_from=True)
    p.add_argument("key", metavar="KEY", help="entry key (or a unique prefix of at least 6 hex digits)")
    p.set_defaults(func=cmd_show)

    p = actions.add_parser("get", help="download an entry's artifacts, verified")
    _add_store_arguments(p, read_from=True)
    p.add_argument("key", metavar="KEY", help="entry key (or a unique prefix)")
    p.add_argument("-o", "--output", required=True, help="directory to write the artifacts into")
    p.add_argument("--name", dest="names", action="append", default=None, help="only this artifact (repeatable)")
    p.set_defaults(func=cmd_get)

    p = actions.add_parser("put", help="publish files as an entry (exit 1 and nothing stored if the key exists)")
    _add_store_arguments(p, read_from=False)
    p.add_argument("--key-inputs", required=True, metavar="JSON", help="JSON file with the inputs the key is computed from")
    p.add_argument("--key", default=None, help="expected key (checked against --key-inputs)")
    p.add_argument("--extra", default=None, metavar="JSON", help="JSON file recorded in the manifest as `extra`")
    p.add_argument("files", nargs="+", metavar="[NAME=]PATH", help="artifact files (named by their file name unless NAME= is given)")
    p.set_defaults(func=cmd_put)

    p = actions.add_parser("verify", help="check every byte of every entry (exit 1 if any is corrupt)")
    _add_store_arguments(p, read_from=False)
    _add_filters(p)
    p.set_defaults(func=cmd_verify)

    p = actions.add_parser("gc", help="delete orphaned staging data and entries older than a date")
    _add_store_arguments(p, read_from=False)
    p.add_argument("--older-than", default=None, metavar="AGE|DATE", help="also delete entries created before this")
    p.add_argument("--orphan-grace", default=None, metavar="AGE", help="keep unreferenced staging data younger than this")
    p.add_argument("--dry-run", action="store_true", default=None, help="report what would be deleted")
    p.set_defaults(func=cmd_gc)

    p = actions.add_parser("export", help="write an entry's TensorRT calibration cache for a TensorRT version")
    _add_store_arguments(p, read_from=True)
    p.add_argument("--key", required=True, help="entry key (or a unique prefix)")
    p.add_argument("--trt-version", required=True, help="TensorRT version that will read the cache, e.g. 10.16.1")
    p.add_argument(
        "--method",
        default=None,
        help="export this method's scales (entropy2, minmax, ... or a TensorRT header name); an entry without them is an "
        "error listing the methods it has (default: calibration.cache as stored)",
    )
    p.add_argument("--artifact", default=None, help="artifact holding the cache (default: the method's, else calibration.cache)")
    p.add_argument("-o", "--output", required=True, help="output file, or - for stdout")
    p.set_defaults(func=cmd_export)


# shared plumbing


class _ScrubFilter(logging.Filter):
    def __init__(self, scrub: Any) -> None:
        super().__init__()
        self._scrub = scrub

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self._scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def _protect_logs(storage_options: dict[str, Any]) -> None:
    """Keep credentials out of log output: mask known secrets on every handler; silence client debug logs."""
    from trtcal._secrets import Scrubber, secret_values

    scrub = Scrubber(secret_values(storage_options))
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _ScrubFilter) for f in handler.filters):
            handler.addFilter(_ScrubFilter(scrub))
    for name in _NOISY_LOGGERS:  # botocore logs request headers (the access key id) at DEBUG
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.INFO:
            logger.setLevel(logging.INFO)


def _open_store(args: argparse.Namespace, *, read_only: bool, namespace_filter: bool = False) -> Any:
    from trtcal.storage import CacheStore

    options = parse_storage_options(args.storage_options)
    _protect_logs(options)
    kwargs: dict[str, Any] = {"read_only": read_only}
    if args.namespace is not None and not namespace_filter:
        kwargs["namespace"] = args.namespace
    if getattr(args, "read_from", None):
        kwargs["read_from"] = list(args.read_from)
    if getattr(args, "on_corrupt", None) is not None:
        kwargs["on_corrupt"] = args.on_corrupt
    return CacheStore(args.store, **kwargs, **options)


def _filter_from(args: argparse.Namespace) -> Any:
    from trtcal.storage import EntryFilter

    now = datetime.now(timezone.utc)
    return EntryFilter(
        namespace=args.namespace,
        key_prefix=getattr(args, "key_prefix", None),
        model_sha256=getattr(args, "model_sha256", None),
        algorithm=getattr(args, "algorithm", None),
        created_before=None if getattr(args, "older_than", None) is None else parse_moment(args.older_than, now),
        created_after=None if getattr(args, "newer_than", None) is None else parse_moment(args.newer_than, now),
    )


def _resolve_key(store: Any, text: str) -> str:
    from trtcal.storage import EntryFilter
    from trtcal.storage.names import is_key

    if is_key(text):
        return text
    if not re.fullmatch(r"[0-9a-f]{6,63}", text):
        raise ConfigError(f"key {text!r} is neither a 64-digit key nor a prefix of 6+ lower-case hex digits")
    matches = [i.key for i in store.ls(EntryFilter(namespace=store.namespace, key_prefix=text))]
    if len(matches) != 1:
        what = "no entry" if not matches else f"{len(matches)} entries"
        raise ConfigError(f"key prefix {text} matches {what} in namespace {store.namespace} of {store.url}; give more digits")
    return str(matches[0])


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


# actions


def cmd_ls(args: argparse.Namespace) -> int:
    store = _open_store(args, read_only=True, namespace_filter=True)
    store.require_store()
    infos = store.ls(_filter_from(args))
    if args.json:
        _print_json([i.to_dict() for i in infos])
        return 0
    rows = [
        [
            i.namespace,
            i.key[:16],
            _when(i.created_at),
            i.algorithm or "-",
            (i.model_sha256 or "-")[:12],
            _size(i.size),
            str(i.artifact_count) if i.problem is None else f"UNREADABLE: {i.problem}",
        ]
        for i in infos
    ]
    print(_table(["NAMESPACE", "KEY", "CREATED (UTC)", "ALGORITHM", "MODEL", "SIZE", "ARTIFACTS"], rows))
    print(f"{len(infos)} entr{'y' if len(infos) == 1 else 'ies'} in {store.url}", file=sys.stderr)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    store = _open_store(args, read_only=True)
    key = _resolve_key(store, args.key)
    try:
        entry = store.get(key)
    except CorruptEntryError as exc:
        if args.json:
            _print_json({"key": key, "ok": False, "problem": str(exc), "url": exc.url})
        else:
            print(f"CORRUPT: {exc}")
        return 1
    if entry is None:
        raise StorageError(f"no cache entry {key} in namespace {store.namespace} of {store.url}", url=store.url)
    manifest = entry.manifest
    if args.json:
        _print_json({"key": key, "ok": True, "url": entry.url, "manifest": manifest})
        return 0
    print(_table(["FIELD", "VALUE"], [
        ["key", entry.key],
        ["namespace", entry.namespace],
        ["created (UTC)", _when(entry.created_at)],
        ["trtcal", str(manifest["trtcal_version"])],
        ["url", entry.url],
    ]))
    print("\nkey inputs:")
    print("\n".join(f"  {line}" for line in json.dumps(manifest["key_inputs"], indent=2, sort_keys=True).splitlines()))
    print("\nartifacts:")
    rows = [[name, _size(r["size"]), r["sha256"]] for name, r in sorted(manifest["artifacts"].items())]
    print("\n".join(f"  {line}" for line in _table(["NAME", "SIZE", "SHA256"], rows).splitlines()))
    if manifest["extra"]:
        print("\nextra:")
        print("\n".join(f"  {line}" for line in json.dumps(manifest["extra"], indent=2, sort_keys=True).splitlines()))
    print(f"\nverified: every artifact matches its sha256 ({len(rows)} artifact(s), {_size(entry.size)})")
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    store = _open_store(args, read_only=True)
    key = _resolve_key(store, args.key)
    entry = store.get(key, lazy=True)
    if entry is None:
        raise StorageError(f"no cache entry {key} in namespace {store.namespace} of {store.url}", url=store.url)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = args.names or entry.names
    written = [str(entry.download(name, out_dir / name)) for name in names]
    if args.json:
        _print_json({"key": key, "url": entry.url, "files": written})
    else:
        for path in written:
            print(path)
    return 0


def _read_json_file(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} {path} is not JSON: {exc.msg} at line {exc.lineno}") from None


def cmd_put(args: argparse.Namespace) -> int:
    from trtcal.storage import compute_cache_key

    store = _open_store(args, read_only=False)
    inputs = _read_json_file(args.key_inputs, "--key-inputs")
    if not isinstance(inputs, dict):
        raise ConfigError(f"--key-inputs {args.key_inputs} must hold a JSON object")
    extra = _read_json_file(args.extra, "--extra") if args.extra else None
    if extra is not None and not isinstance(extra, dict):
        raise ConfigError(f"--extra {args.extra} must hold a JSON object")
    key = compute_cache_key(inputs)
    if args.key is not None and args.key != key:
        raise ConfigError(f"--key {args.key} does not match --key-inputs, which give {key}")
    artifacts: dict[str, Any] = {}
    for spec in args.files:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = os.path.basename(spec), spec
        if name in artifacts:
            raise ConfigError(f"artifact {name!r} given twice")
        artifacts[name] = _regular_file(name, Path(path))
    # Taken already: say so before uploading anything (publish would discard our copy).
    entry = store.get(key, lazy=True)
    if entry is None:
        entry = store.publish(key, artifacts, key_inputs=inputs, extra=extra)
    if not entry.created:
        return _report_existing(args, entry, artifacts)
    if args.json:
        _print_json({"key": entry.key, "namespace": entry.namespace, "url": entry.url, "artifacts": entry.names, "created": True})
    else:
        print(entry.key)
        print(f"published to {entry.url}", file=sys.stderr)
    return 0


def _regular_file(name: str, path: Path) -> Path:
    """A FIFO with no writer blocks `open` forever and /dev/zero never ends: `put` takes regular files only."""
    import stat

    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"artifact {name!r}: cannot use {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        raise ConfigError(f"artifact {name!r}: {path} is {kind}, not a regular file; give a regular file (write it to disk first)")
    return path


def _report_existing(args: argparse.Namespace, entry: Any, artifacts: dict[str, Path]) -> int:
    """`cache put` onto a taken key: nothing was stored; say whether the stored entry equals the given files."""
    import hashlib

    stored = entry.manifest["artifacts"]
    differ = sorted(set(stored) ^ set(artifacts))
    for name, path in sorted(artifacts.items()):
        if name in stored:
            digest = hashlib.sha256()
            try:
                with open(path, "rb") as f:
                    while chunk := f.read(8 << 20):
                        digest.update(chunk)
            except OSError as exc:
                raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
            if digest.hexdigest() != stored[name]["sha256"]:
                differ.append(name)
    same = not differ
    if args.json:
        _print_json({"key": entry.key, "namespace": entry.namespace, "url": entry.url, "created": False, "identical": same,
                     "differing_artifacts": sorted(differ)})
    else:
        print(entry.key)
        what = "the same artifacts as yours" if same else f"different artifacts (differ: {', '.join(sorted(differ))})"
        print(f"entry {entry.key} already exists at {entry.url} (created {_when(entry.created_at)} UTC) with {what}; "
              "nothing was stored (entries never change: different --key-inputs give a different key)", file=sys.stderr)
    return 1


def cmd_verify(args: argparse.Namespace) -> int:
    store = _open_store(args, read_only=True, namespace_filter=True)
    store.require_store()
    results = store.verify(_filter_from(args))
    bad = [r for r in results if not r.ok]
    if args.json:
        _print_json({"checked": len(results), "corrupt": len(bad), "results": [r.to_dict() for r in results]})
    else:
        rows = [[r.namespace, r.key[:16], "ok" if r.ok else "CORRUPT", "" if r.ok else f"{r.url}: {r.problem}"] for r in results]
        print(_table(["NAMESPACE", "KEY", "STATUS", "PROBLEM"], rows))
        print(f"{len(results)} checked, {len(bad)} corrupt", file=sys.stderr)
    return 1 if bad else 0


def cmd_gc(args: argparse.Namespace) -> int:
    store = _open_store(args, read_only=False, namespace_filter=True)
    store.require_store()
    kwargs: dict[str, Any] = {"namespace": args.namespace, "dry_run": bool(args.dry_run)}
    if args.older_than is not None:
        kwargs["older_than"] = parse_moment(args.older_than)
    if args.orphan_grace is not None:
        kwargs["orphan_grace"] = parse_duration(args.orphan_grace)
    report = store.gc(**kwargs)
    if args.json:
        _print_json(report.to_dict())
        return 0
    verb = "would remove" if report.dry_run else "removed"
    for name in report.removed_entries:
        print(f"{verb} entry {name}")
    for url in report.removed_orphans:
        print(f"{verb} orphan {url}")
    for url in report.unreadable_manifests:
        print(f"left alone (unreadable manifest; see `trtcal cache verify`): {url}")
    print(
        f"{verb} {len(report.removed_entries)} entr{'y' if len(report.removed_entries) == 1 else 'ies'} and "
        f"{len(report.removed_orphans)} orphan(s), {_size(report.bytes_freed)}; "
        f"kept {report.kept_recent_orphans} recent unreferenced staging dir(s)",
        file=sys.stderr,
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    store = _open_store(args, read_only=True)
    key = _resolve_key(store, args.key)
    kwargs: dict[str, Any] = {"trt_version": args.trt_version, "algorithm": args.method}
    if args.artifact is not None:
        kwargs["artifact"] = args.artifact
    data = store.export_trt_cache(key, **kwargs)
    if args.output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return 0
    target = Path(args.output)
    try:
        write_atomic(target, data)
    except OSError as exc:
        raise StorageError(f"cannot write {target}: {exc.strerror or exc}", url=str(target)) from None
    header = data.split(b"\n", 1)[0].decode()
    print(f"wrote {target} ({header})", file=sys.stderr)
    return 0
