"""r18_arcface at 32x32 distilled from a frozen r50_arcface_224 teacher (alpha 0.7, T 4): tutorial 57.37%."""

from fastcifar.config import derive


def recipe():
    r = derive("r18_arcface")
    # the newest runs/r50_arcface_224-*/best.pt; or --set distill.teacher=RUN_DIR_OR_CHECKPOINT.
    # The teacher sees the same augmented batch resized to its own 224x224.
    r.distill.teacher = "r50_arcface_224"
    r.distill.alpha = 0.7        # loss = 0.3 * CE + 0.7 * T^2 * KL(teacher_T || student_T)
    r.distill.temperature = 4.0
    return r
