"""Fold IA3's input scale of an attention output linear into the value's output scale: one pass fewer over the
[batch, seq, hidden] attention context per layer.

The attention context is `context[:, f] = sum_j p_ij V[j, f]`, with the softmax weights p a function of q, k and
the mask alone, so scaling context feature f by a row's `l_in[f]` equals scaling V's output feature f by it (heads
split and merged in the same feature order). The value's output scale is the last op of its site (attach_ia3), so
`(... + db + lora(x) + x D^T) * l_v * l_in` keeps every term's order. The pass folds only where that holds exactly:
the context is `scaled_dot_product_attention` (no dropout, no GQA) between a head split and a head merge of one
shape, and every node from the value's site output to the scale has one reader (another, e.g. a LoRA or sparse
delta of the output linear, wants the context unscaled).

Tables: the value's `ia3_out` table gets `fold_in` = the output linear's site and holds `l_v * l_in - 1`
(runtime/tables.py fills it); the output linear's `ia3_in` table leaves the program. A value site without an output
scale gets one, with such a table."""

from __future__ import annotations

from dataclasses import replace

from torch.fx import GraphModule, Node

from pets_compiler.passes.attention_heads import (
    ATEN,
    head_reshape,
    same_shape,
    sdpa_dropout,
    shape_of,
    skip_copies,
    sole_input,
    split_source,
    swaps_1_2,
)
from pets_compiler.passes.context import (
    CompileContext,
    PassResult,
    cleanup,
    insert_after,
    op_target,
    site_output,
)
from pets_compiler.runtime.tables import SLOTS, TableSpec


def _value_output(context: Node) -> Node | None:
    """The node whose per-feature scale equals one of `context`: v where context is
    merge(transpose(sdpa(q, k, transpose(split(v))))) with one reader at every step; None otherwise."""
    heads = shape_of(sole_input(context))
    if not head_reshape(context, heads):
        return None
    swap = skip_copies(sole_input(context))
    sdpa = skip_copies(sole_input(swap)) if swaps_1_2(swap) else None
    if sdpa is None or sdpa.target is not ATEN.scaled_dot_product_attention.default:
        return None
    v = sdpa.args[2]
    if sdpa_dropout(sdpa) != 0.0 or sdpa.kwargs.get("enable_gqa", False) or not isinstance(v, Node):
        return None
    if len(v.users) != 1 or sum(a is v for a in (*sdpa.args, *sdpa.kwargs.values())) != 1:  # V is also q, k or mask
        return None
    found = split_source(v)
    return found[0] if found is not None and same_shape(found[1], heads) else None


def _table_specs(gm: GraphModule, ctx: CompileContext) -> dict[Node, TableSpec]:
    """Each table input's spec: tables are the last inputs, in ctx.tables' order."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return dict(zip(placeholders[len(placeholders) - len(ctx.tables) :], ctx.tables, strict=True))


def fold_context_scale(gm: GraphModule, ctx: CompileContext) -> PassResult:
    """linear(scale(context(V), t, l_in - 1)) -> linear(context(scale(V, t, l_v * l_in - 1))) at attention outputs."""
    task_ids = ctx.require_task_ids()
    scale = op_target("scale")
    value_sites = {site_output(node): site for site, node in ctx.linear_nodes.items()}
    merged = added = 0
    done = {t.fold_in for t in ctx.tables}
    for site in ctx.plan.ia3_in:
        if site in done:
            continue
        linear = ctx.linear_nodes[site]
        scaled = linear.args[0]
        assert isinstance(scaled, Node) and scaled.target is scale, f"{site}: attach_ia3 must run first"
        context = sole_input(scaled)
        v_out = None if context is None else _value_output(context)
        value = None if v_out is None else value_sites.get(v_out)
        if context is None or v_out is None or value is None:
            continue
        specs = _table_specs(gm, ctx)
        out_table = v_out.args[2] if v_out.target is scale else None
        out_spec = specs.get(out_table) if isinstance(out_table, Node) else None
        if out_spec is not None and out_spec.kind == "ia3_out" and out_spec.site == value:
            ctx.tables[ctx.tables.index(out_spec)] = replace(out_spec, fold_in=site)
            merged += 1
        else:
            width = ctx.base.sites.linear[value][0]
            spec = TableSpec(f"{value}.ia3_out", "ia3_out", value, "scale", (SLOTS, width), fold_in=site)
            table = ctx.add_table(gm, spec)
            insert_after(gm, v_out, scale, (v_out, task_ids, table))
            added += 1
        in_table = scaled.args[2]
        assert isinstance(in_table, Node)
        linear.replace_input_with(scaled, context)
        gm.graph.erase_node(scaled)
        ctx.tables.remove(specs[in_table])  # the runtime passes tables in this order: drop spec and input together
        gm.graph.erase_node(in_table)
    if merged + added:
        cleanup(gm)
    detail = (
        f"folded {merged + added} IA3 scales of an attention context into the value's output scale "
        f"({merged} into an existing one, {added} new)"
    )
    return PassResult("fold_context_scale", merged + added, detail)
