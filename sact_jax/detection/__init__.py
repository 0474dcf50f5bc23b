"""Object detection with (S)ACT backbones: box arithmetic, anchors, NMS, RoIs.

Boxes are `[..., 4]` arrays `(ymin, xmin, ymax, xmax)`, the convention of
the TF Object Detection API that the SACT paper's Faster R-CNN used.
"""
