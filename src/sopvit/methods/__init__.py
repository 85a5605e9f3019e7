"""Pre-training methods behind one interface: SOP (the paper's), and iBOT and DINO as baselines."""

from sopvit.methods.interface import Objective, StudentOutputs, TeacherOutputs, TokenPlan

__all__ = ["Objective", "StudentOutputs", "TeacherOutputs", "TokenPlan"]
