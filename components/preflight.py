"""Pre-flight: before anything heavy runs, what the merge will read, write and need, and what looks wrong.

A thin view of ``merging.hub.preflight``: the safetensors headers only (range requests for Hub models), the
engine's own plan and compatibility report, and its estimates of reads, disk, memory and time.
"""

import gradio as gr

from merging import hub
from merging.config import MergeConfig

from .common import AppSettings, failure, hf_token, hub_resolver, human_bytes, human_seconds, load_config
from .sessions import SessionStore


def warnings_for(p, config: MergeConfig) -> list[str]:
    """What a user should know before merging, from the pre-flight's header summaries (no weights read)."""
    out = list(p.report.get("notes") or [])
    vocab = {}
    for m in p.models:
        for name in ("model.embed_tokens.weight", "transformer.wte.weight", "lm_head.weight"):
            if name in m.tensors:
                vocab[m.ref] = m.tensors[name][1][0]
                break
    if len(set(vocab.values())) > 1:
        sizes = ", ".join(f"{_short(ref)}: {n}" for ref, n in vocab.items())
        hint = "" if config.allow_vocab_mismatch else " (turn on 'Allow vocabulary mismatch' to merge the shared rows)"
        out.append(f"vocabulary sizes differ: {sizes}{hint}")
    untied = [m for m in p.models if "lm_head.weight" in m.tensors]
    tied = [m for m in p.models if "lm_head.weight" not in m.tensors and "model.embed_tokens.weight" in m.tensors]
    if tied and untied:
        out.append(f"tied embeddings in {', '.join(_short(m.ref) for m in tied)} but a separate lm_head in "
                   f"{', '.join(_short(m.ref) for m in untied)}")
    elif tied:
        out.append("tied embeddings: the output head is the embedding matrix, merged once")
    in_dtypes = {dt for m in p.models for dt, _ in m.tensors.values() if dt in ("F32", "F16", "BF16", "F64")}
    out_dtype = config.output_dtype
    if out_dtype and in_dtypes - {out_dtype}:
        out.append(f"dtype change: inputs are {', '.join(sorted(in_dtypes))}, the output will be {out_dtype}")
    elif len(in_dtypes) > 1:
        out.append(f"inputs mix dtypes ({', '.join(sorted(in_dtypes))}); the output follows the base")
    from merging.methods import get_method

    if get_method(config.merge_method).randomized:
        out.append(f"{config.merge_method} is random: seed {config.seed} makes it reproducible")
    return out


def _short(ref: str) -> str:
    return ref.rstrip("/").rsplit("/", 1)[-1] if ref.startswith(("/", ".")) else ref


def preflight_markdown(p, config: MergeConfig) -> str:
    """The pre-flight as a table of inputs and one line of estimates, then the warnings."""
    lines = ["| checkpoint | where | tensors | parameters | size |", "|---|---|---:|---:|---:|"]
    for m in p.models:
        label = _short(m.ref)
        lines.append(f"| `{label}` | {m.location} | {len(m.tensors)} | {m.parameters / 1e6:.2f} M | "
                     f"{human_bytes(m.bytes)} |")
    status = "compatible" if p.compatible else f"incompatible: {p.report_text}"
    lines += ["", f"**{status}** · {p.tensors_out} output tensors · reads {human_bytes(p.bytes_to_read)} "
              f"({human_bytes(p.bytes_from_hub)} from the Hub) · disk {human_bytes(p.disk_needed)} · "
              f"peak memory ≈ {human_bytes(p.peak_memory)} · ≈ {human_seconds(p.est_seconds)}", ""]
    lines += [f"- warning: {w}" for w in warnings_for(p, config)[:12]]
    return "\n".join(lines)


def build_preflight_panel():
    button = gr.Button("Check (pre-flight)", elem_id="preflight-button", size="sm")
    out = gr.Markdown(elem_id="preflight")
    return button, out


def wire_preflight(button, out, cf, settings: AppSettings, sessions: SessionStore) -> None:
    """``cf``: the method form's ``ConfigForm`` (``config_text`` is the config to check)."""

    def run(values: dict, request: gr.Request, oauth_token: gr.OAuthToken | None = None) -> str:
        try:
            session = sessions.get(request.session_hash)
            config = load_config(cf.config_text(values), settings, [session.folder])
            token = hf_token(oauth_token)
            return preflight_markdown(hub.preflight(config, token, resolver=hub_resolver(token)), config)
        except Exception as exc:  # noqa: BLE001 - shown where it happened (failure() logs bugs with their traceback)
            return failure("pre-flight", exc)

    button.click(run, cf.inputs(), out, api_visibility="private", show_progress_on=[out])
