fastdiff eval --checkpoint runs/mnist5k-student --sampler student --steps 4 --seed 50000
