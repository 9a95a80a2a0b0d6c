"""`GET /docs`: the API's reference as one HTML page, rendered on the server from the app's own
OpenAPI schema, with no script and nothing fetched from elsewhere.

FastAPI's Swagger page loads its JavaScript from a CDN, which a server on an offline machine
cannot reach; this page works anywhere. `/openapi.json` stays the machine-readable source (for
Swagger UI, code generators, schemathesis). Each route lists its request fields: type, default,
bounds and what the schema says of them.
"""

from __future__ import annotations

from html import escape
from typing import Any

STYLE = ("body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;"
         "padding:0 1rem}code,td:first-child{font-family:ui-monospace,monospace}"
         "table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ddd;"
         "padding:.25rem .5rem;text-align:left;vertical-align:top}h2{margin-top:2rem}"
         ".m{font-weight:bold;color:#0a5}")


def page(schema: dict[str, Any]) -> str:
    """The HTML of the reference for `schema` (an OpenAPI document)."""
    info = schema.get("info", {})
    title = escape(info.get("title", "API"))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{title} API</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>{title} {escape(info.get('version', ''))}</h1>",
             "<p>The machine-readable schema: <a href='/openapi.json'>/openapi.json</a>.</p>"]
    components = schema.get("components", {}).get("schemas", {})
    for path, methods in schema.get("paths", {}).items():
        for method, op in methods.items():
            parts.append(f"<h2><span class='m'>{method.upper()}</span> <code>{escape(path)}"
                         "</code></h2>")
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            ref = body.get("schema", {}).get("$ref", "")
            model = components.get(ref.rsplit("/", 1)[-1]) if ref else None
            if model is not None:
                parts.append(_fields(model, components))
    parts.append("</body></html>")
    return "\n".join(parts)


def _fields(model: dict[str, Any], components: dict[str, Any]) -> str:
    required = set(model.get("required", ()))
    rows = ["<table><tr><th>field</th><th>type</th><th>default</th><th>bounds</th></tr>"]
    for name, spec in model.get("properties", {}).items():
        bounds = ", ".join(f"{k} {s[k]}" for s in [spec, *spec.get("anyOf", ())]
                           for k in ("minimum", "maximum", "maxLength") if k in s)
        default = "required" if name in required else escape(repr(spec.get("default")))
        rows.append(f"<tr><td>{escape(name)}</td><td>{escape(_type(spec))}</td>"
                    f"<td>{default}</td><td>{escape(bounds)}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def _type(spec: dict[str, Any]) -> str:
    if "$ref" in spec:
        return spec["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in spec:
        return " | ".join(_type(s) for s in spec["anyOf"])
    if spec.get("type") == "array":
        return f"list[{_type(spec.get('items', {}))}]"
    if "enum" in spec:
        return " | ".join(repr(v) for v in spec["enum"])
    return str(spec.get("type", "any"))
