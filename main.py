"""Natural training + ADMM pruning: ``python main.py --config configs/demo.yaml`` (see engine.py)."""
from engine import run

if __name__ == "__main__":
    run(adversarial=False)
