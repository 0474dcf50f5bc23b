"""`workdirs.ensure_writable_dir`: a bad directory fails first, in one line."""

import os
import shutil
import tempfile
from unittest import mock

from absl.testing import absltest

from sact_jax import workdirs


class EnsureWritableDirTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)

  def test_creates_missing_directories_and_leaves_no_probe(self):
    path = os.path.join(self.tmp, 'a', 'b')
    workdirs.ensure_writable_dir(path)
    self.assertTrue(os.path.isdir(path))
    self.assertEmpty(os.listdir(path))
    workdirs.ensure_writable_dir(path)  # Existing: fine, and unchanged.
    self.assertEmpty(os.listdir(path))

  def test_a_file_is_no_directory(self):
    path = os.path.join(self.tmp, 'file')
    with open(path, 'w') as f:
      f.write('data')
    for target, reason in (
        (path, 'it exists and is not a directory'),
        (os.path.join(path, 'sub'), 'Not a directory')):
      with self.assertRaisesRegex(workdirs.WorkdirError,
                                  f'^Cannot create or write to the directory '
                                  f'{target}: {reason}\\.$'):
        workdirs.ensure_writable_dir(target)
    with open(path) as f:
      self.assertEqual(f.read(), 'data')

  def test_uncreatable_directory(self):
    """The issue's case: mkdir fails even for root (no traceback upstream)."""
    with self.assertRaisesRegex(workdirs.WorkdirError, '/proc/nope'):
      workdirs.ensure_writable_dir('/proc/nope')

  def test_failed_check_removes_what_it_made(self):
    """Directories exist but take no files: the ones made are removed."""
    existing = os.path.join(self.tmp, 'existing')
    os.mkdir(existing)
    path = os.path.join(existing, 'a', 'b')
    with mock.patch.object(workdirs.tempfile, 'NamedTemporaryFile',
                           side_effect=PermissionError(13, 'Permission '
                                                       'denied')):
      with self.assertRaisesRegex(workdirs.WorkdirError,
                                  'b: Permission denied.$'):
        workdirs.ensure_writable_dir(path)
    self.assertEqual(os.listdir(self.tmp), ['existing'])
    self.assertEmpty(os.listdir(existing))

  def test_is_a_value_error(self):
    """Callers that catch bad input as ValueError catch it too."""
    self.assertTrue(issubclass(workdirs.WorkdirError, ValueError))


if __name__ == '__main__':
  absltest.main()
