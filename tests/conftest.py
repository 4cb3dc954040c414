"""Makes the helpers shared by every test folder (dist_utils) importable."""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
