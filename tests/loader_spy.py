"""A loader wrapper for tests: it passes batches through and calls fn(epoch, batch_index, images,
labels) before yielding each one (to record what a training loop consumed, or to act mid-epoch)."""


class LoaderSpy:
    def __init__(self, loader, fn):
        self.loader, self.fn, self.epoch, self.start = loader, fn, 0, 0

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start = epoch, start_batch
        self.loader.set_epoch(epoch, start_batch=start_batch)

    def __iter__(self):
        for i, (images, labels) in enumerate(self.loader, start=self.start):
            self.fn(self.epoch, i, images, labels)
            yield images, labels
