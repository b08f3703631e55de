"""Metric names in PromQL, for tests/tests/deploy.rs.

Parses with promql-parser (PyPI; GreptimeDB's Rust PromQL parser, the same
grammar as Prometheus), so a name is one the query really selects, not a
word that looks like one. Run with tests/.venv/bin/python:

    promql_names.py exprs        < ["expr", ...]   -> [{"expr", "names"} | {"expr", "error"}]
    promql_names.py rules FILE                      -> [{"rule", "expr"}]  (alerting and recording rules)
    promql_names.py series FILE                     -> [{"series", "name", "labels"}]  (promtool test input series)

Every answer is JSON on stdout. A selector without a literal metric name
(`{__name__=~"..."}`) is reported as an error: the caller could not check it.
"""

import json
import sys

import promql_parser as p
import yaml


def names(node, out):
    """Adds the metric names that `node` selects to `out`."""
    if isinstance(node, p.VectorSelector):
        name = node.name
        if name is None:
            for m in node.matchers.matchers:
                if m.name == "__name__" and m.op == p.MatchOp.Equal:
                    name = m.value
        if name is None:
            raise ValueError(f"selector without a literal metric name: {node}")
        out.add(name)
    elif isinstance(node, p.MatrixSelector):
        names(node.vector_selector, out)
    elif isinstance(node, p.SubqueryExpr):
        names(node.expr, out)
    elif isinstance(node, (p.ParenExpr, p.UnaryExpr)):
        names(node.expr, out)
    elif isinstance(node, p.AggregateExpr):
        names(node.expr, out)
        if node.param is not None:
            names(node.param, out)
    elif isinstance(node, p.BinaryExpr):
        names(node.lhs, out)
        names(node.rhs, out)
    elif isinstance(node, p.Call):
        for a in node.args:
            names(a, out)
    elif isinstance(node, (p.NumberLiteral, p.StringLiteral)):
        pass
    else:
        raise ValueError(f"unknown PromQL node {type(node).__name__}: {node}")


def expr_names(exprs):
    out = []
    for e in exprs:
        try:
            found = set()
            names(p.parse(e), found)
            out.append({"expr": e, "names": sorted(found)})
        except Exception as err:  # parse errors are reported, not raised
            out.append({"expr": e, "error": str(err)})
    return out


def rules(path):
    with open(path) as f:
        doc = yaml.safe_load(f)
    out = []
    for g in doc["groups"]:
        for r in g["rules"]:
            out.append({"rule": r.get("alert") or r.get("record"), "expr": r["expr"]})
    return out


def series(path):
    with open(path) as f:
        doc = yaml.safe_load(f)
    out = []
    for t in doc["tests"]:
        for s in t.get("input_series", []):
            v = p.parse(s["series"])
            if not isinstance(v, p.VectorSelector) or v.name is None:
                raise ValueError(f"not a series: {s['series']}")
            labels = sorted(m.name for m in v.matchers.matchers)
            out.append({"series": s["series"], "name": v.name, "labels": labels})
    return out


def main():
    cmd = sys.argv[1]
    if cmd == "exprs":
        result = expr_names(json.load(sys.stdin))
    elif cmd == "rules":
        result = rules(sys.argv[2])
    elif cmd == "series":
        result = series(sys.argv[2])
    else:
        sys.exit(f"unknown command {cmd}")
    json.dump(result, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
