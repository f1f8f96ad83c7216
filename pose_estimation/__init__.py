"""Pose and hand estimators shared by the annotator, the converters' fill-ins and the metrics.

``datamodules`` and ``metrics`` both import this package; it imports neither (nor any method),
so the data layer stays free of metrics. Backends: :class:`MediaPipePeople` (offline default,
models shipped in the mediapipe wheel), :class:`RTMLibPeople` (RTMPose / RTMO / RTMW / DWPose
ONNX models from local paths through onnxruntime), :class:`MMPoseBottomUp` (needs compiled
mmcv). The protocol: :mod:`pose_estimation.people`.
"""

from pose_estimation.mediapipe_people import MediaPipePeople
from pose_estimation.mmpose_bottomup import MMPoseBottomUp
from pose_estimation.people import PeopleEstimator, PoseEstimator
from pose_estimation.rtmlib_people import RTMLibPeople

__all__ = ["MMPoseBottomUp", "MediaPipePeople", "PeopleEstimator", "PoseEstimator", "RTMLibPeople"]
