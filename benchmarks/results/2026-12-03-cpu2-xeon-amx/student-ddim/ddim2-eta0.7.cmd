fastdiff eval --checkpoint runs/mnist5k-student --sampler ddim --steps 2 --eta 0.7
