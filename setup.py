"""tf_dpsparse: differentially private, top-k sparse federated learning on TF."""

from setuptools import find_packages
from setuptools import setup

setup(
    name='tf_dpsparse',
    version='0.1.0',
    description=('Differentially private, communication-efficient (top-k '
                 'sparse, both directions) federated learning for IoT and '
                 'mobile devices on TensorFlow, TFF, Keras and LiteRT.'),
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.11,<3.12',
    packages=find_packages(include=['tf_dpsparse', 'tf_dpsparse.*']),
    # The exact, tested pins live in requirements.txt (and
    # requirements-nodeps.txt for TFF, which cannot be resolved by pip here).
    install_requires=[
        'tensorflow==2.14.*',
        'tensorflow-privacy==0.9.0',
        'dp-accounting==0.4.3',
        'numpy~=1.25',
        'tqdm>=4.64',
        'matplotlib>=3.7',
    ],
    extras_require={
        'lite': ['ai-edge-litert==2.3.0'],
        'data': ['scikit-learn>=1.3'],
        'test': ['pytest>=8', 'pytest-timeout', 'hypothesis'],
    },
    entry_points={'console_scripts': ['tf-dpsparse=tf_dpsparse.cli:main']},
)
