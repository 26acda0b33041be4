fastdiff eval --checkpoint runs/mnist5k-student --sampler ddim --steps 4 --eta 0.7
