"""Training building blocks, plain PyTorch/diffusers (Ray and DeepSpeed are wired in elsewhere):

- :mod:`rayimg.train.trainee`: ``build_trainee(loaded, job)`` -> a Trainee module whose forward
  returns the loss (LoRA, DreamBooth, textual inversion, full fine-tune);
- :mod:`rayimg.train.loop`: the training loop (``Loop``: train_step, checkpoint state, validation,
  export), one process or one rank of many;
- :mod:`rayimg.train.checkpoint`: checkpoint state as safetensors + JSON (nothing unpickled);
- :mod:`rayimg.train.class_images`: DreamBooth class images the class folder lacks, rendered
  with the base model;
- :mod:`rayimg.train.tensorboard_log` and :mod:`rayimg.train.plots`: TensorBoard events,
  ``loss.png`` and the validation grid of a run;
- :mod:`rayimg.train.optim`: optimizer and LR schedule;
- :mod:`rayimg.train.export`: LoRA (diffusers + kohya), textual inversion and full-model files;
- the registry the exported files are published to lives in :mod:`rayimg.registry`;
- :mod:`rayimg.train.deepspeed_config`: the DeepSpeed config dict built from the job.
"""
