"""r18_arcface at 32x32 distilled from a frozen r50_arcface_224 teacher (alpha 0.7, T 4) as its code ran it: tutorial 57.37%."""

from fastcifar.config import derive


def recipe():
    r = derive("r18_arcface")
    # the newest runs/r50_arcface_224-*/best.pt; or --set distill.teacher=RUN_DIR_OR_CHECKPOINT.
    # The teacher sees the same augmented batch resized to its own 224x224.
    r.distill.teacher = "r50_arcface_224"
    r.distill.alpha = 0.7        # loss = 0.3 * CE + 0.7 * T^2 * KL(teacher_T || student_T)
    r.distill.temperature = 4.0
    r.distill.teacher_margin = True  # its KD put the ArcFace margin (true labels) on the teacher's logits too
    r.distill.teacher_bn = "train"   # its teacher was frozen but never in eval mode: batch statistics
    return r
