fastdiff eval --checkpoint pretrained:mnist-student --sampler ddim --steps 4 --eta 0.7
