"""The JSON schema (draft 7) of tierd.yaml, and the reference page rendered from it.

The schema states types, ranges and allowed keys; defaults live in the
tierd.config dataclasses and are merged in when the reference is rendered,
so docs/configuration.md is `tierd check-config --print-reference` and cannot
drift from either.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any


def _obj(description: str, **properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "description": description,
            "additionalProperties": False, "properties": properties}


def _num(description: str, **bounds: float) -> dict[str, Any]:
    return {"type": "number", "description": description, **bounds}


def _int(description: str, **bounds: int) -> dict[str, Any]:
    return {"type": "integer", "description": description, **bounds}


def _bool(description: str) -> dict[str, Any]:
    return {"type": "boolean", "description": description}


def _bool_or_auto(description: str) -> dict[str, Any]:
    return {"type": ["boolean", "string"], "enum": [True, False, "auto"],
            "description": description}


def _enum(description: str, *values: str) -> dict[str, Any]:
    return {"type": "string", "description": description, "enum": list(values)}


def _list(description: str, items: dict[str, Any], max_items: int) -> dict[str, Any]:
    return {"type": "array", "description": description, "items": items,
            "uniqueItems": True, "maxItems": max_items}


SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "tierd configuration",
    **_obj(
        "tierd's configuration file, /etc/tierd/tierd.yaml. Every key is optional.",
        interval=_num("Seconds from the start of one interval (collect, decide, move) to the"
                      " next.", minimum=0.1, maximum=3600),
        dry_run=_bool("Decide and count as usual but never move a page."),
        collectors=_obj(
            "Where access evidence comes from. Several may be on; their evidence adds up.",
            idle=_obj(
                "The idle-page bitmap (/sys/kernel/mm/page_idle/bitmap).",
                enabled=_bool("Scan the idle-page bitmap."),
                interval=_num("Seconds between two scans of the same PFN (at least one"
                              " interval; longer when the scan itself, paced by"
                              " pfns_per_second, takes longer). Each scan is one *round*:"
                              " heat decays and hysteresis counts per round, not per"
                              " interval. The first scan reads back after one interval.",
                              minimum=1, maximum=86400),
                nodes=_list("NUMA nodes to scan; an empty list scans every node with memory.",
                            {"type": "integer", "minimum": 0, "maximum": 1023}, 1024),
                pfns_per_second=_int("Cap on PFNs scanned per second: each bitmap write walks"
                                     " the reverse map, which costs CPU.",
                                     minimum=1000, maximum=1 << 40),
            ),
            perf=_obj(
                "Memory-access samples from perf (AMD IBS, Intel PEBS, or software events).",
                enabled=_bool("Take perf samples."),
                backend=_enum("How samples are read: `ctypes` (perf_event_open and the ring"
                              " buffer directly) or `bcc` (a BPF program; needs python3-bpfcc).",
                              "ctypes", "bcc"),
                events=_list("perf event names; an empty list picks the best the CPU offers.",
                             {"type": "string", "minLength": 1, "maxLength": 128,
                              "pattern": "^[A-Za-z0-9_][A-Za-z0-9_:./=,-]*$"}, 16),
                sample_period=_int("Events per sample.", minimum=1000, maximum=1 << 32),
            ),
            damon=_obj(
                "DAMON access monitoring; used on its own when neither the idle bitmap nor"
                " a memory-sampling PMU is available.",
                enabled=_bool_or_auto("`auto`: DAMON only when neither the idle bitmap nor"
                                      " a memory-sampling PMU is usable; `true`: also"
                                      " beside them; `false`: never."),
                operations=_enum("`vaddr`: the 8 largest processes (one kdamond each), their"
                                 " regions translated to PFNs through pagemap: hot and cold"
                                 " data stay apart in virtual memory however pages move."
                                 " `paddr`: the nodes' physical address ranges (one kdamond);"
                                 " its regions mix hot and cold pages once they interleave.",
                                 "vaddr", "paddr"),
                sampling_interval=_num("Seconds between DAMON's access checks.",
                                       minimum=0.0001, maximum=10),
                aggregation_interval=_num("Seconds over which DAMON counts accesses; at least"
                                          " the sampling interval.",
                                          minimum=0.001, maximum=3600),
            ),
        ),
        policy=_obj(
            "How heat turns into promotions and demotions.",
            heat_decay=_num("Share of a page's heat kept from one round to the next (0"
                            " forgets at once). A round is an idle scan, or one interval"
                            " when the idle collector is off.", minimum=0, exclusiveMaximum=1),
            hot_threshold=_num("Heat at or above which a slow-tier page is hot.",
                               exclusiveMinimum=0, maximum=1e9),
            cold_threshold=_num("Heat at or below which a fast-tier page is cold; below"
                                " hot_threshold.", minimum=0, maximum=1e9),
            hysteresis_intervals=_int("Consecutive rounds (idle scans, or intervals without"
                                      " the idle collector) a page must stay hot (cold)"
                                      " before it is promoted (demoted), unless its heat"
                                      " reaches twice hot_threshold within a round"
                                      " (samples or DAMON regions); a moved page sits"
                                      " out one round more before it may move again.",
                                      minimum=1, maximum=100),
            headroom_percent=_num("Percent of each fast node's memory kept free above its"
                                  " promo/high watermark while hot pages wait below it, so"
                                  " promotions never push the node into reclaim; each hot page"
                                  " waiting brings one page of it back, so a few waiting cost"
                                  " a few demotions. With none waiting, tierd demotes nothing,"
                                  " even below the watermark, where the kernel's reclaim"
                                  " acts.",
                                  minimum=0, maximum=50),
            demote_cold=_bool("Demote every settled-cold page, as far as the node below has"
                              " room, even when the fast node does not need the room. Off,"
                              " cold pages leave only to make room for hot pages: fewer"
                              " moves, a fuller fast tier."),
            budget_split=_obj(
                "How an interval's move budget (movers.rate_mb_per_s times interval) is"
                " shared; promote + demote must be 1.",
                promote=_num("Share for promotions.", minimum=0, maximum=1),
                demote=_num("Share for demotions.", minimum=0, maximum=1),
            ),
        ),
        movers=_obj(
            "How pages move.",
            kind=_enum("`phys` (move_phys_pages, on kernels that have it), `pid`"
                       " (move_pages(2) per process) or `auto` (phys when available).",
                       "auto", "phys", "pid"),
            batch_pages=_int("Pages per migration syscall. Each move_pages call drains every"
                             " CPU's LRU caches: fewer, larger calls cost less per GiB.",
                             minimum=1, maximum=65536),
            rate_mb_per_s=_num("Cap on migrated megabytes (2^20 bytes) per second.",
                               exclusiveMinimum=0, maximum=1e6),
            move_all_shared=_bool_or_auto(
                "Also move pages mapped by several processes (MPOL_MF_MOVE_ALL; needs"
                " CAP_SYS_NICE). `auto`: yes for both movers, since each checks every mapper's"
                " cpuset: the phys mover's kernel (and `MPOL_BIND`), the PID mover each"
                " mapper's `Mems_allowed_list`, as `move_pages(2)` checks only the calling"
                " process's."),
        ),
        exclusions=_obj(
            "Memory tierd never moves.",
            cgroups=_list("cgroup v2 paths (from the cgroup root), with everything below them.",
                          {"type": "string", "pattern": "^/", "maxLength": 4096}, 1024),
            pids=_list("Process IDs.", {"type": "integer", "minimum": 1, "maximum": 4194304},
                       4096),
            comms=_list("fnmatch patterns matched against the process name (comm).",
                        {"type": "string", "minLength": 1, "maxLength": 64}, 1024),
        ),
        kernel_tiering=_enum(
            "What to do when the kernel tiers memory itself (NUMA balancing mode 2, or"
            " demotion_enabled): `coexist` runs alongside, `warn` logs a warning and runs,"
            " `refuse` exits with an error.", "coexist", "warn", "refuse"),
        metrics=_obj(
            "The Prometheus endpoint and status page.",
            enabled=_bool("Serve /metrics and the status page."),
            address={"type": "string", "maxLength": 64,
                     "description": "IP address to bind (IPv4 or IPv6 literal)."},
            port=_int("TCP port to bind.", minimum=1, maximum=65535),
            allow_remote=_bool("Required to bind an address other than loopback: metrics"
                               " show memory layout to whoever can reach the port."),
        ),
    ),
}


# Checked by tierd.config after the schema (a JSON schema cannot compare values).
CROSS_FIELD_RULES = (
    "`policy.cold_threshold` is below `policy.hot_threshold`.",
    "`policy.budget_split.promote` + `policy.budget_split.demote` = 1.",
    "`collectors.damon.aggregation_interval` ≥ `collectors.damon.sampling_interval`.",
    "`metrics.address` is an IP address, and a loopback one unless `metrics.allow_remote`"
    " is true.",
    "No number is NaN or infinite.",
)


def render_reference(defaults: dict[str, Any]) -> str:
    """Markdown reference of every key: type, range, default and meaning."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `tierd check-config --print-reference` from"
        " tierd/config_schema.py; do not edit. -->",
        "",
        "tierd reads `/etc/tierd/tierd.yaml` by default. Every key is"
        " optional and takes the default below; unknown keys, wrong types, values out of range"
        " and contradictory settings are errors naming the file, line and key, and"
        " `tierd check-config FILE` reports them (exit status 78 on error). YAML aliases,"
        " duplicate keys and language-specific tags are refused.",
        "",
        "| key | type | allowed | default | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += _rows(SCHEMA, defaults)
    lines += ["", "Rules across keys:", ""] + [f"- {rule}" for rule in CROSS_FIELD_RULES]
    return "\n".join(lines) + "\n"


def _keys(schema: dict[str, Any], defaults: dict[str, Any],
          prefix: str = "") -> Iterator[tuple[str, dict[str, Any], Any]]:
    """(dotted key, its schema, its default) in document order; a mapping before its keys."""
    for name, sub in schema["properties"].items():
        key = f"{prefix}{name}"
        yield key, sub, defaults[name]
        if sub["type"] == "object":
            yield from _keys(sub, defaults[name], f"{key}.")


def _rows(schema: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    return [f"| **`{key}`** | mapping | | | {sub['description']} |" if sub["type"] == "object"
            else f"| `{key}` | {_type_name(sub)} | {_allowed(sub)} |"
                 f" `{_yaml_value(default)}` | {sub['description']} |"
            for key, sub, default in _keys(schema, defaults)]


def _type_name(schema: dict[str, Any]) -> str:
    if isinstance(schema["type"], list):
        return " or ".join(schema["type"])
    if schema["type"] == "array":
        return f"list of {schema['items']['type']}"
    return str(schema["type"])


def _allowed(schema: dict[str, Any]) -> str:
    if "enum" in schema:
        return ", ".join(f"`{_yaml_value(v)}`" for v in schema["enum"])
    if schema["type"] == "array":
        return _allowed(schema["items"]) or "any"
    bounds = [f"{sign} {schema[word]}" for word, sign in _BOUND_SIGNS if word in schema]
    pattern = [f"matches `{schema['pattern']}`"] if "pattern" in schema else []
    return ", ".join(bounds + pattern)


_BOUND_SIGNS = (("minimum", "≥"), ("exclusiveMinimum", ">"),
                ("maximum", "≤"), ("exclusiveMaximum", "<"))


def _yaml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


# --- tierd.yaml(5) ------------------------------------------------------------------


def render_manpage(defaults: dict[str, Any], version: str, date: str) -> str:
    """tierd.yaml(5) in roff: the same keys, defaults and rules as the reference."""
    lines = [
        f'.TH TIERD.YAML 5 "{date}" "tierd {version}" "File Formats"',
        ".SH NAME",
        r"tierd.yaml \- configuration file of the tierd memory\-tiering daemon",
        ".SH SYNOPSIS",
        "/etc/tierd/tierd.yaml",
        ".SH DESCRIPTION",
        _roff(SCHEMA["description"]),
        ".PP",
        _roff("Every key is optional and takes the default shown; unknown keys, wrong types,"
              " values out of range and contradictory settings are errors naming the file,"
              " line and key. `tierd check-config FILE` reports them (exit status 78)."
              " `systemctl reload tierd` applies a good file from the next interval; a bad"
              " one is refused and the running configuration stays in force."),
        ".SH KEYS",
        *_man_keys(SCHEMA, defaults),
        ".SH RULES ACROSS KEYS",
        *(f".IP \\(bu 2\n{_roff(rule)}" for rule in CROSS_FIELD_RULES),
        ".SH EXAMPLES",
        _roff("The packaged file starts in a dry run: tierd decides and counts"
              " (tierd_dry_run_pages_total) but moves nothing. After reviewing"
              " `tierd status`, switch to moving pages with one line:"),
        ".PP",
        ".nf",
        r".RS 4",
        r"sed \-i 's/^dry_run: true/dry_run: false/' /etc/tierd/tierd.yaml",
        r"tierd check\-config /etc/tierd/tierd.yaml && systemctl reload tierd",
        ".RE",
        ".fi",
        ".SH FILES",
        ".TP",
        "/etc/tierd/tierd.yaml",
        "The configuration file.",
        ".TP",
        "/usr/share/doc/tierd/examples/",
        "Example configurations, Prometheus alerts and a Grafana dashboard.",
        ".SH SEE ALSO",
        r"\fBtierd\fR(8), \fBsystemctl\fR(1)",
    ]
    return "\n".join(lines) + "\n"


def _man_keys(schema: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    lines = []
    for key, sub, default in _keys(schema, defaults):
        if sub["type"] == "object":
            lines += [".SS " + _roff(key), _roff(sub["description"])]
            continue
        allowed = _allowed(sub)
        facts = f"{_type_name(sub)}{', ' + allowed if allowed else ''};"
        lines += [".TP", f"\\fB{_roff(key)}\\fR", _roff(
            f"{sub['description']} ({facts} default `{_yaml_value(default)}`)")]
    return lines


def _roff(markdown: str) -> str:
    """Markdown-ish text as a roff paragraph: `code` bold, *word* italic, escaped."""
    text = markdown.replace("\\", "\\e").replace("-", "\\-")
    text = re.sub(r"`([^`]*)`", r"\\fB\1\\fR", text)
    text = re.sub(r"\*([^*\s][^*]*)\*", r"\\fI\1\\fR", text)
    text = text.replace("≥", "\\(>=").replace("≤", "\\(<=")
    # A line starting with . or ' would be read as a request.
    return re.sub(r"^([.'])", r"\\&\1", text, flags=re.MULTILINE)
