"""Evaluation metrics of handdiff: torchmetrics ``Metric`` subclasses, DDP-aware."""

from metrics.clip_sim import CLIPSim
from metrics.fid_kid import FID, KID
from metrics.hand_pose import HandPoseAccuracy
from metrics.inference_timer import InferenceTimer
from metrics.pose_ap import PoseAP

__all__ = ["FID", "KID", "CLIPSim", "HandPoseAccuracy", "InferenceTimer", "PoseAP"]
