"""What findings 1-4 share: they are planned from one spec (``paper_findings.yaml``: ``widths``
and the keys after it) and read one table of its cells.

The table groups the cells over seeds by their fields: ``kind`` (pretrain, admm, inherited; an
AutoAttack cell takes its model's kind and has ``aa`` set), ``training``, ``width``, ``scheme``,
``matched_width`` (the dense width whose weight count a pruned model has) and ``source_width`` (the
model an inherited one comes from).
"""
from cells import matched_ratios, pre, ratio_sets
from frame import Table

KEY = "widths"  # the spec section that asks for findings 1-4
FIELDS = ("kind", "aa", "training", "width", "scheme", "matched_width", "source_width")


def rows(summary):
    """One row per finished cell: its fields, seed and figures (accuracies, nonzero weights)."""
    by_id = {c["id"]: c for c in summary["cells"]}
    out = []
    for c in summary["cells"]:
        model = by_id.get(c["meta"].get("of")) if c["kind"] == "autoattack" else c
        if model is None:
            continue
        ev, m = c["eval"], c["meta"]
        out.append({"kind": model["kind"], "aa": c["kind"] == "autoattack", "seed": c["seed"],
                    **{f: m.get(f) for f in FIELDS[2:]}, **ev["accuracy"], "worst_case": ev["worst_case"],
                    "nonzero": sum(layer["nonzero"] for layer in ev["sparsity"]["layers"])})
    return out


def table(summary):
    return Table(rows(summary), FIELDS)


def dense(T, training, width, aa=False):
    """The key of the dense models of ``width``, ``training`` adversarial or natural."""
    return T.key(kind="pretrain", aa=aa, training=training, width=width)


def pruned(T, spec, scheme, matched_width, training="adversarial", aa=False):
    """The key of the large model pruned by ADMM (+ masked retraining) to ``matched_width``'s count."""
    return T.key(kind="admm", aa=aa, training=training, width=spec["large_width"], scheme=scheme,
                 matched_width=matched_width)


def inherited(T, spec, aa=False):
    """The key of the small model inherited from the large one, then trained adversarially."""
    return T.key(kind="inherited", aa=aa, training="adversarial", width=spec["small_width"],
                 source_width=spec["large_width"])


def plan_pruned(cells, number, spec, seed, scheme, matched_width, adversarial=True):
    """Add the cell that prunes the large adversarially trained model to ``matched_width``'s weight
    count: ADMM then masked retraining, adversarial (``adv_main.py``) or natural (``main.py``)."""
    L = spec["large_width"]
    script = "adv_main.py" if adversarial else "main.py"
    ratios = matched_ratios(L, matched_width)
    base = [f"model.width={L}", f"prune.sparsity_type={scheme}", *ratio_sets(ratios)]
    steps = [{"script": script, "stage": "admm", "init": ("cell", pre("adv", L, seed), "pretrain.pt"), "sets": base},
             {"script": script, "stage": "retrain", "init": None, "sets": base}]
    cid = f"{'admm' if adversarial else 'natadmm'}-{scheme}-w{matched_width}count-s{seed}"
    cells.add(cid, [number], "admm", seed, {"width": L, "scheme": scheme, "ratios": ratios,
                                             "training": "adversarial" if adversarial else "natural",
                                             "matched_width": matched_width},
              steps, "retrain.pt", [pre("adv", L, seed)])
