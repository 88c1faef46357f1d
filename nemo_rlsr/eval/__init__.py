"""Evaluation of trained policies: benchmark answer files (AlpacaEval, Arena-Hard), HF export."""
