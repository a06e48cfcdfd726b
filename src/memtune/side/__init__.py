"""Side networks beside a frozen backbone (QST): arch.py, downsample.py, network.py."""
