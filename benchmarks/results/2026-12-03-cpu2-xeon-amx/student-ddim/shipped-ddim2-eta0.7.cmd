fastdiff eval --checkpoint pretrained:mnist-student --sampler ddim --steps 2 --eta 0.7
