"""An mmpose 1.x bottom-up body model as a people estimator (bodies only)."""

from __future__ import annotations

import numpy as np

from pose_estimation.people import Part, PeopleEstimator, new_person, with_boxes


class MMPoseBottomUp(PeopleEstimator):
    """An mmpose 1.x bottom-up model (HumanSD used HigherHRNet-w48 trained on Human-Art),
    from a model config and checkpoint; COCO-17 bodies, no hands. Needs mmcv built with its
    ops (``docs/mmpose.md``: a ~34 min build with ``-std=c++20``); without it, construction
    fails with that explanation."""

    def __init__(self, config: str, checkpoint: str, device: str = "cpu", part: Part = "body"):
        if part != "body":
            raise ValueError(f"MMPoseBottomUp part={part!r}: it estimates bodies only")
        try:
            from mmpose.apis import inference_bottomup, init_model
        except (ImportError, ModuleNotFoundError) as exc:
            raise ImportError(
                f"MMPoseBottomUp needs mmpose inference, which needs mmcv compiled with its "
                f"ops ({exc}). Build mmcv 2.1.0 from source with -std=c++20 (docs/mmpose.md), "
                "or use pose_estimation.MediaPipePeople or pose_estimation.RTMLibPeople."
            ) from exc
        self.part = part
        self._inference = inference_bottomup
        self.model = init_model(config, checkpoint, device=device)

    def people(self, image: np.ndarray) -> list[dict]:
        # mmpose expects BGR arrays, as read by cv2
        (sample,) = self._inference(self.model, np.ascontiguousarray(image[..., ::-1]))
        instances = sample.pred_instances
        kp = np.asarray(instances.keypoints, dtype=np.float64)
        scores = np.asarray(instances.keypoint_scores, dtype=np.float64)
        people = [
            new_person(
                np.concatenate([points, point_scores[:, None]], -1), float(point_scores.mean())
            )
            for points, point_scores in zip(kp, scores, strict=True)
        ]
        return with_boxes(people)
