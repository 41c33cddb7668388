"""One loader interface over the backends (the contract the train loop relies on).

    loader = make_loader(store, "train", spec, batch_size=250, backend="auto", device="cuda:0",
                         seed=0, shard=(rank, world), shuffle=True)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)          # order and augmentation draws are a function of (seed, epoch)
        for images, labels in loader:    # images: NCHW channels_last, spec.dtype, on device
            ...                          # labels: int64 (N,), on device

- backend: "auto" (DALI wherever it imports, else torch) | "dali" | "torch" | "tutorial".
- augment: defaults to split == "train"; evaluation loaders only resize and normalise.
- indices: optional rows of the split to use (e.g. the train/validation partition).
- sizes: optional tuple of output sides, e.g. (32, 224) for distillation; then `images` is a
  tuple of tensors, one per size, all from one augmentation draw.
- shard=(rank, world): training shards are disjoint and equally long; evaluation shards
  together cover every image exactly once; the last evaluation batch may be smaller (never padded).
- len(loader) is the number of batches per epoch; loader.num_samples the images per epoch (this
  shard); loader.backend names what runs ("dali-gpu", "dali-cpu", "torch", "tutorial").
"""
