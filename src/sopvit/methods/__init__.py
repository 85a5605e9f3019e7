"""Every pre-training objective behind one interface: SOP (the paper's), and iBOT and DINO as baselines.

``interface`` defines what the loop sees, ``distill`` the math they share, ``registry`` one row per method.
"""

from sopvit.methods.interface import (
    HeadPrototypes,
    MethodSpec,
    Objective,
    ScheduleValues,
    StudentOutputs,
    TeacherOutputs,
    TokenPlan,
)
from sopvit.methods.registry import get_method, method_names, register, unregister

__all__ = [
    "HeadPrototypes",
    "MethodSpec",
    "Objective",
    "ScheduleValues",
    "StudentOutputs",
    "TeacherOutputs",
    "TokenPlan",
    "get_method",
    "method_names",
    "register",
    "unregister",
]
