"""The findings, in order: the sweep plans their cells and the report writes their sections by
looping over this list."""
import adversarial_pruning
import capacity
import fair_arena
import prune_vs_small
import quant_report
import schemes

FINDINGS = tuple(m.FINDING for m in (capacity, prune_vs_small, schemes, adversarial_pruning, fair_arena,
                                     quant_report))
assert [f.number for f in FINDINGS] == list(range(1, len(FINDINGS) + 1)), "findings are numbered 1, 2, ... in order"
