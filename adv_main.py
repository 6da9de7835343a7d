"""PGD adversarial training (Madry et al.) + ADMM pruning, the concurrent scheme of Ye, Xu et al.
(ICCV 2019): ``python adv_main.py --config configs/demo.yaml`` (see engine.py)."""
from engine import run

if __name__ == "__main__":
    run(adversarial=True)
